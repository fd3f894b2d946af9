//! Array diffing: trim the common ends, align the middle (by identity key or by longest common
//! subsequence), and emit operations whose indexes hold as each earlier operation applies.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::eq::{hash_of, json_eq, FxBuild};
use super::generate::Gen;

/// Largest edit distance the exact (Myers) alignment explores; its history takes O(D²) memory,
/// so this keeps it to a few MB. Larger differences go through unique anchors first.
const MAX_EDIT_DISTANCE: usize = 512;

/// Edit distance up to which the values are aligned directly, before numbering them.
const SMALL_EDIT_DISTANCE: usize = 32;

/// Emit the operations turning array `a` (at `g.path`) into `b`.
pub(super) fn diff_array<'a>(g: &mut Gen<'a, '_>, a: &'a [Value], b: &'a [Value]) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| json_eq(x, y)).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| json_eq(x, y))
        .count();
    let ma = &a[prefix..a.len() - suffix];
    let mb = &b[prefix..b.len() - suffix];

    if ma.is_empty() {
        for (t, v) in mb.iter().enumerate() {
            g.with_index(prefix + t, |g| g.add(v));
        }
        return;
    }
    if mb.is_empty() {
        for t in (0..ma.len()).rev() {
            g.with_index(prefix + t, |g| g.remove());
        }
        return;
    }

    let opts = g.opts;
    if let Some(key) = opts.array_key.as_deref() {
        if let (Some(ka), Some(kb)) = (identities(key, ma), identities(key, mb)) {
            by_identity(g, prefix, ma, mb, &ka, &kb);
            return;
        }
    }
    let matches = align(ma, mb, &mut g.budget);
    by_matches(g, prefix, ma, mb, &matches);
}

// ---------------------------------------------------------------------------------------------
// Alignment by content.

/// Walk an alignment of `ma` and `mb` (monotone pairs of equal elements) left to right.
///
/// Invariant: before each step the array is `new[..idx] ++ old[i..]` (shifted by `offset`), so
/// every index below is where the element sits at that moment.
fn by_matches<'a>(
    g: &mut Gen<'a, '_>,
    offset: usize,
    ma: &'a [Value],
    mb: &'a [Value],
    matches: &[(usize, usize)],
) {
    let mut idx = offset;
    let (mut i, mut j) = (0, 0);
    let end = (ma.len(), mb.len());
    for &(mi, mj) in matches.iter().chain(std::iter::once(&end)) {
        let (ga, gb) = (&ma[i..mi], &mb[j..mj]);
        // Pair removed and added elements position by position: a recursive diff (or a
        // `replace`) is never larger than `remove` + `add`.
        let paired = ga.len().min(gb.len());
        for (x, y) in ga.iter().zip(gb) {
            g.with_index(idx, |g| g.value(x, y));
            idx += 1;
        }
        for t in (0..ga.len() - paired).rev() {
            g.with_index(idx + t, |g| g.remove());
        }
        for y in &gb[paired..] {
            g.with_index(idx, |g| g.add(y));
            idx += 1;
        }
        if (mi, mj) != end {
            // Equal elements: nothing to do.
            idx += 1;
            i = mi + 1;
            j = mj + 1;
        }
    }
}

/// A longest (or, past the work budget, a good) common subsequence of `ma` and `mb`, as
/// increasing `(index in ma, index in mb)` pairs.
fn align(ma: &[Value], mb: &[Value], budget: &mut u64) -> Vec<(usize, usize)> {
    // Usually only a few elements changed: try the exact algorithm on the values themselves
    // first, which compares each kept element about once and needs no hashing.
    let direct = |i: usize, j: usize| json_eq(&ma[i], &mb[j]);
    if let Some(m) = myers((ma.len(), mb.len()), direct, SMALL_EDIT_DISTANCE, budget) {
        return m;
    }
    let (ia, ib) = intern(ma, mb);
    let mut out = Vec::new();
    let mut todo = vec![(0, ia.len(), 0, ib.len())];
    while let Some((mut a0, mut a1, mut b0, mut b1)) = todo.pop() {
        while a0 < a1 && b0 < b1 && ia[a0] == ib[b0] {
            out.push((a0, b0));
            a0 += 1;
            b0 += 1;
        }
        while a0 < a1 && b0 < b1 && ia[a1 - 1] == ib[b1 - 1] {
            out.push((a1 - 1, b1 - 1));
            a1 -= 1;
            b1 -= 1;
        }
        if a0 == a1 || b0 == b1 {
            continue;
        }
        let (sa, sb) = (&ia[a0..a1], &ib[b0..b1]);
        if let Some(m) = myers(
            (sa.len(), sb.len()),
            |i, j| sa[i] == sb[j],
            MAX_EDIT_DISTANCE,
            budget,
        ) {
            out.extend(m.into_iter().map(|(x, y)| (x + a0, y + b0)));
            continue;
        }
        // Too different for the exact algorithm: anchor on elements that occur exactly once on
        // each side (patience diff) and align the gaps between anchors the same way.
        let (mut pa, mut pb) = (a0, b0);
        for (x, y) in patience(sa, sb, budget) {
            let (x, y) = (x + a0, y + b0);
            out.push((x, y));
            todo.push((pa, x, pb, y));
            pa = x + 1;
            pb = y + 1;
        }
        if pa != a0 {
            todo.push((pa, a1, pb, b1));
        }
    }
    out.sort_unstable();
    out
}

/// Number every distinct element (by JSON equality) so alignment compares integers.
fn intern(ma: &[Value], mb: &[Value]) -> (Vec<u32>, Vec<u32>) {
    let mut table = Interner::default();
    let ia = ma.iter().map(|v| table.id(v)).collect();
    let ib = mb.iter().map(|v| table.id(v)).collect();
    (ia, ib)
}

#[derive(Default)]
struct Interner<'v> {
    /// Hash -> the first distinct value with that hash and its id.
    first: HashMap<u64, (u32, &'v Value), FxBuild>,
    /// Further distinct values whose hash collided with a `first` one.
    more: Vec<(u64, u32, &'v Value)>,
    next: u32,
}

impl<'v> Interner<'v> {
    fn id(&mut self, v: &'v Value) -> u32 {
        let hash = hash_of(v);
        let fresh = self.next;
        match self.first.entry(hash) {
            Entry::Vacant(e) => {
                e.insert((fresh, v));
            }
            Entry::Occupied(e) => {
                let &(id, w) = e.get();
                if json_eq(w, v) {
                    return id;
                }
                let found = self
                    .more
                    .iter()
                    .find(|(h, _, w)| *h == hash && json_eq(w, v));
                if let Some(&(_, id, _)) = found {
                    return id;
                }
                self.more.push((hash, fresh, v));
            }
        }
        self.next += 1;
        fresh
    }
}

/// Myers' greedy O((N+M)·D) shortest edit script between sequences of lengths `n` and `m`
/// (elements compared with `eq(i, j)`), as the matched pairs of a longest common subsequence.
/// `None` when the edit distance exceeds `max_d` or the work exceeds `budget`.
///
/// Works inside the edit grid only: `v[k]` is the furthest x reached on diagonal `k = x - y`
/// (or -1), and the history of `v` (O(D²)) is kept to walk the path back.
fn myers(
    (n, m): (usize, usize),
    mut eq: impl FnMut(usize, usize) -> bool,
    max_d: usize,
    budget: &mut u64,
) -> Option<Vec<(usize, usize)>> {
    let max_d = max_d.min(n + m) as isize;
    let (n, m) = (n as isize, m as isize);
    let at = |k: isize| (k + max_d + 1) as usize;
    let mut v = vec![-1isize; 2 * max_d as usize + 3];
    // For each finished round d: v[-d..=d], stored at d*d.
    let mut hist: Vec<isize> = Vec::new();
    for d in 0..=max_d {
        let cost = 2 * d as u64 + 1;
        if *budget < cost {
            *budget = 0;
            return None;
        }
        *budget -= cost;
        let mut k = -d;
        while k <= d {
            let start = if d == 0 {
                0
            } else {
                step_into(v[at(k + 1)], v[at(k - 1)], k, n, m).0
            };
            if start < 0 {
                v[at(k)] = -1;
                k += 2;
                continue;
            }
            let (mut x, mut y) = (start, start - k);
            while x < n && y < m && eq(x as usize, y as usize) {
                x += 1;
                y += 1;
            }
            *budget = budget.saturating_sub((x - start) as u64);
            v[at(k)] = x;
            if x == n && y == m {
                return Some(myers_path(&hist, d, n, m));
            }
            k += 2;
        }
        hist.extend_from_slice(&v[at(-d)..=at(d)]);
    }
    None
}

/// Where a d-path on diagonal `k` starts, from the previous round's furthest points on
/// `k + 1` (`down`: one more element of `b`) and `k - 1` (`right`: one more element of `a`),
/// staying inside the `n` × `m` grid. Returns `(x, from_down)`, x = -1 when neither exists.
fn step_into(down: isize, right: isize, k: isize, n: isize, m: isize) -> (isize, bool) {
    let x_down = if down >= 0 && down - k <= m { down } else { -1 };
    let x_right = if right >= 0 && right < n {
        right + 1
    } else {
        -1
    };
    if x_down >= x_right {
        (x_down, true)
    } else {
        (x_right, false)
    }
}

/// Walk back from (n, m), reached in round `d`, collecting the diagonal (matching) steps.
fn myers_path(hist: &[isize], mut d: isize, n: isize, m: isize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (mut x, mut y) = (n, m);
    while d > 0 {
        let k = x - y;
        let prev = |q: isize| {
            if q.abs() > d - 1 {
                -1
            } else {
                hist[((d - 1) * (d - 1) + q + d - 1) as usize]
            }
        };
        let (start, from_down) = step_into(prev(k + 1), prev(k - 1), k, n, m);
        while x > start {
            x -= 1;
            y -= 1;
            out.push((x as usize, y as usize));
        }
        if from_down {
            y -= 1;
        } else {
            x -= 1;
        }
        d -= 1;
    }
    while x > 0 {
        x -= 1;
        y -= 1;
        out.push((x as usize, y as usize));
    }
    out.reverse();
    out
}

/// Anchors for a large alignment: elements occurring exactly once in `a` and once in `b`,
/// reduced to their longest increasing run (so they can all be kept). Empty if none, or when
/// the budget is spent.
fn patience(a: &[u32], b: &[u32], budget: &mut u64) -> Vec<(usize, usize)> {
    let cost = 4 * (a.len() + b.len()) as u64;
    if *budget < cost {
        *budget = 0;
        return Vec::new();
    }
    *budget -= cost;
    // id -> (count in a, count in b, index in a, index in b)
    let mut seen: HashMap<u32, (u32, u32, usize, usize)> = HashMap::new();
    for (i, &x) in a.iter().enumerate() {
        let e = seen.entry(x).or_insert((0, 0, 0, 0));
        e.0 += 1;
        e.2 = i;
    }
    for (j, &y) in b.iter().enumerate() {
        if let Some(e) = seen.get_mut(&y) {
            e.1 += 1;
            e.3 = j;
        }
    }
    let mut pairs: Vec<(usize, usize)> = seen
        .values()
        .filter(|e| e.0 == 1 && e.1 == 1)
        .map(|e| (e.2, e.3))
        .collect();
    pairs.sort_unstable();
    let js: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    longest_increasing(&js)
        .into_iter()
        .map(|t| pairs[t])
        .collect()
}

/// Indexes (increasing) of a longest strictly increasing subsequence of `seq`, O(n log n).
fn longest_increasing(seq: &[usize]) -> Vec<usize> {
    let mut tails: Vec<usize> = Vec::new();
    let mut prev = vec![usize::MAX; seq.len()];
    for (i, &x) in seq.iter().enumerate() {
        let pos = tails.partition_point(|&t| seq[t] < x);
        if pos > 0 {
            prev[i] = tails[pos - 1];
        }
        if pos == tails.len() {
            tails.push(i);
        } else {
            tails[pos] = i;
        }
    }
    let mut out = Vec::with_capacity(tails.len());
    let mut cur = tails.last().copied();
    while let Some(i) = cur {
        out.push(i);
        cur = (prev[i] != usize::MAX).then_some(prev[i]);
    }
    out.reverse();
    out
}

// ---------------------------------------------------------------------------------------------
// Alignment by identity key.

/// An element's identity: the scalar under the route's key. Numbers are identified by their
/// text, as they are compared (`eq.rs`): `7` and `7.0` are different elements, and 30-digit ids
/// one apart stay apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Identity<'a> {
    Str(&'a str),
    Num(&'a str),
    Bool(bool),
}

/// The identities of `elems`, if every element is an object with a scalar (not null) under
/// `key` and no two share one.
fn identities<'a>(key: &str, elems: &'a [Value]) -> Option<Vec<Identity<'a>>> {
    let mut seen = HashSet::with_capacity(elems.len());
    let mut out = Vec::with_capacity(elems.len());
    for e in elems {
        let obj = e.as_object()?;
        // The key is usually the first member; skip the lookup then.
        let value = match obj.iter().next() {
            Some((k, v)) if k == key => v,
            _ => obj.get(key)?,
        };
        let id = match value {
            Value::String(s) => Identity::Str(s),
            Value::Bool(b) => Identity::Bool(*b),
            Value::Number(n) => Identity::Num(n.as_str()),
            _ => return None,
        };
        if !seen.insert(id) {
            return None;
        }
        out.push(id);
    }
    Some(out)
}

/// Emit operations matching elements by identity: removed identities are removed, new ones
/// added, the rest diffed recursively; elements whose relative order changed are `move`d
/// (all but a longest run of elements already in order, which stay put).
///
/// Index bookkeeping: every element that is or will be in the array gets a *slot* in a line
/// whose order is always the array's order: the old elements that stay or will move (in old
/// order), and, for each new element that is added or moved in, a slot right after the slot
/// of the staying element that precedes it in the new order. A Fenwick tree over occupied
/// slots turns a slot into the element's current index.
fn by_identity<'a>(
    g: &mut Gen<'a, '_>,
    offset: usize,
    ma: &'a [Value],
    mb: &'a [Value],
    ka: &[Identity<'a>],
    kb: &[Identity<'a>],
) {
    let index_b: HashMap<Identity<'a>, usize> =
        kb.iter().enumerate().map(|(j, k)| (*k, j)).collect();
    // Old elements whose identity is gone: remove them first, last first so indexes hold.
    let mut matched: Vec<(usize, usize)> = Vec::new(); // (index in ma, index in mb), old order
    for (i, k) in ka.iter().enumerate() {
        if let Some(&j) = index_b.get(k) {
            matched.push((i, j));
        }
    }
    {
        let mut keep = matched.iter().map(|&(i, _)| i).rev().peekable();
        for i in (0..ma.len()).rev() {
            if keep.peek() == Some(&i) {
                keep.next();
            } else {
                g.with_index(offset + i, |g| g.remove());
            }
        }
    }

    let js: Vec<usize> = matched.iter().map(|&(_, j)| j).collect();
    let stay = longest_increasing(&js); // indexes into `matched`
    let mut stays = vec![false; matched.len()];
    for &t in &stay {
        stays[t] = true;
    }
    let mut source = vec![None; mb.len()]; // new index -> index into `matched`
    for (t, &(_, j)) in matched.iter().enumerate() {
        source[j] = Some(t);
    }

    // Slot layout.
    let mut slots = 0usize;
    let mut slot_old = vec![0usize; matched.len()];
    let mut slot_new = vec![0usize; mb.len()];
    let stay_js: Vec<usize> = stay.iter().map(|&t| matched[t].1).collect();
    for s in &mut slot_new[..stay_js.first().copied().unwrap_or(mb.len())] {
        *s = slots;
        slots += 1;
    }
    let mut next_stay = 0;
    for (t, &(_, j)) in matched.iter().enumerate() {
        slot_old[t] = slots;
        slots += 1;
        if stays[t] {
            next_stay += 1;
            let end = stay_js.get(next_stay).copied().unwrap_or(mb.len());
            for s in &mut slot_new[j + 1..end] {
                *s = slots;
                slots += 1;
            }
        }
    }

    let mut occupied = Fenwick::new(slots);
    for &s in &slot_old {
        occupied.add(s, 1);
    }
    for (j, y) in mb.iter().enumerate() {
        match source[j] {
            Some(t) if stays[t] => {
                let x = &ma[matched[t].0];
                // Most matched elements are unchanged; comparing is cheaper than diffing.
                if !json_eq(x, y) {
                    let at = offset + occupied.before(slot_old[t]);
                    g.with_index(at, |g| g.value(x, y));
                }
            }
            Some(t) => {
                let from = offset + occupied.before(slot_old[t]);
                occupied.add(slot_old[t], -1);
                let to = offset + occupied.before(slot_new[j]);
                occupied.add(slot_new[j], 1);
                if from != to {
                    let from = g.index_path(from);
                    g.with_index(to, |g| g.move_from(from));
                }
                g.with_index(to, |g| g.value(&ma[matched[t].0], y));
            }
            None => {
                let to = offset + occupied.before(slot_new[j]);
                occupied.add(slot_new[j], 1);
                g.with_index(to, |g| g.add(y));
            }
        }
    }
}

/// Counts of occupied slots with prefix sums in O(log n).
struct Fenwick(Vec<isize>);

impl Fenwick {
    fn new(n: usize) -> Self {
        Fenwick(vec![0; n + 1])
    }

    fn add(&mut self, slot: usize, delta: isize) {
        let mut i = slot + 1;
        while i < self.0.len() {
            self.0[i] += delta;
            i += i & i.wrapping_neg();
        }
    }

    /// Occupied slots before `slot`.
    fn before(&self, slot: usize) -> usize {
        let (mut i, mut sum) = (slot, 0isize);
        while i > 0 {
            sum += self.0[i];
            i -= i & i.wrapping_neg();
        }
        sum.max(0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain O(nm) LCS length, the reference for `myers`.
    fn lcs_len(a: &[u32], b: &[u32]) -> usize {
        let mut dp = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                dp[i][j] = if a[i] == b[j] {
                    dp[i + 1][j + 1] + 1
                } else {
                    dp[i + 1][j].max(dp[i][j + 1])
                };
            }
        }
        dp[0][0]
    }

    fn check_matches(a: &[u32], b: &[u32], m: &[(usize, usize)]) {
        for w in m.windows(2) {
            assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1, "not increasing: {m:?}");
        }
        for &(i, j) in m {
            assert_eq!(a[i], b[j]);
        }
    }

    #[test]
    fn myers_is_an_optimal_lcs() {
        // A small deterministic generator (xorshift) over small alphabets, so there are many
        // repeats and ties.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        for _ in 0..3000 {
            let alpha = 1 + rnd(5) as u32;
            let a: Vec<u32> = (0..rnd(12)).map(|_| rnd(alpha as u64) as u32).collect();
            let b: Vec<u32> = (0..rnd(12)).map(|_| rnd(alpha as u64) as u32).collect();
            let mut budget = u64::MAX;
            let m = myers((a.len(), b.len()), |i, j| a[i] == b[j], 100, &mut budget)
                .expect("distance fits");
            check_matches(&a, &b, &m);
            assert_eq!(m.len(), lcs_len(&a, &b), "a={a:?} b={b:?} m={m:?}");
        }
    }

    #[test]
    fn myers_gives_up_past_max_d_and_budget() {
        let a: Vec<u32> = (0..100).collect();
        let b: Vec<u32> = (100..200).collect();
        let eq = |i: usize, j: usize| a[i] == b[j];
        let mut plenty = u64::MAX;
        assert!(myers((100, 100), eq, 50, &mut plenty).is_none());
        let mut budget = 10;
        assert!(myers((100, 100), eq, 500, &mut budget).is_none());
        assert_eq!(budget, 0);
        assert!(myers((100, 100), eq, 200, &mut plenty).is_some());
    }

    #[test]
    fn align_is_increasing_and_equal() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        for round in 0..200 {
            let len = if round % 10 == 0 { 3000 } else { 40 };
            let a: Vec<Value> = (0..rnd(len)).map(|_| Value::from(rnd(len))).collect();
            let b: Vec<Value> = (0..rnd(len)).map(|_| Value::from(rnd(len))).collect();
            let m = align(&a, &b, &mut 1_000_000);
            for w in m.windows(2) {
                assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1);
            }
            for &(i, j) in &m {
                assert_eq!(a[i], b[j]);
            }
        }
    }

    #[test]
    fn longest_increasing_works() {
        assert_eq!(longest_increasing(&[]), Vec::<usize>::new());
        assert_eq!(longest_increasing(&[3, 0, 1, 2]), vec![1, 2, 3]);
        assert_eq!(longest_increasing(&[5, 4, 3]).len(), 1);
        assert_eq!(longest_increasing(&[0, 8, 4, 12, 2, 10, 6, 14]).len(), 4);
    }
}
