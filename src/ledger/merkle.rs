//! The RFC 9162 (Certificate Transparency v2) Merkle tree over ledger
//! entries: leaf = SHA-256(0x00 ‖ entry hash), node = SHA-256(0x01 ‖ left ‖
//! right), with inclusion and consistency proofs and their verification
//! (RFC 9162 §2.1).
//!
//! [`Frontier`] keeps the roots of the perfect subtrees of the tree so far
//! (at most one per level), so the root after each append costs O(log n).

use sha2::{Digest, Sha256};

/// A 32-byte hash.
pub type Hash = [u8; 32];

/// Hash of a leaf whose data is `entry_hash`.
pub fn leaf_hash(entry_hash: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry_hash);
    h.finalize().into()
}

/// Hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Largest power of two smaller than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// MTH over leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// Inclusion proof of leaf `index` in the tree of `leaves` (RFC 9162
/// §2.1.3.1). `None` if out of range.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
        let n = d.len();
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            path(m, &d[..k], out);
            out.push(root(&d[k..]));
        } else {
            path(m - k, &d[k..], out);
            out.push(root(&d[..k]));
        }
    }
    let mut out = Vec::new();
    path(index, leaves, &mut out);
    Some(out)
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Consistency proof between the first `m` leaves and all of `leaves`
/// (RFC 9162 §2.1.4.1). `None` unless 0 < m ≤ n.
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Option<Vec<Hash>> {
    if m == 0 || m > leaves.len() {
        return None;
    }
    fn subproof(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
        let n = d.len();
        if m == n {
            if !complete {
                out.push(root(d));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            subproof(m, &d[..k], complete, out);
            out.push(root(&d[k..]));
        } else {
            subproof(m - k, &d[k..], false, out);
            out.push(root(&d[..k]));
        }
    }
    let mut out = Vec::new();
    subproof(m, leaves, true, &mut out);
    Some(out)
}

/// Verifies a consistency proof between trees of `size1` and `size2`
/// leaves with roots `root1` and `root2` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &Hash,
    root2: &Hash,
) -> bool {
    if size1 == 0 || size1 > size2 {
        return false;
    }
    if size1 == size2 {
        return proof.is_empty() && root1 == root2;
    }
    let mut proof: Vec<Hash> = proof.to_vec();
    if size1.is_power_of_two() {
        proof.insert(0, *root1);
    }
    let Some((first, rest)) = proof.split_first() else {
        return false;
    };
    let (mut fnode, mut snode) = (size1 - 1, size2 - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *root1 && sr == *root2
}

/// MTH of leaves `start .. start + len` through `perfect(height, index)`,
/// which returns the root of an aligned perfect subtree (height 0: a leaf
/// hash). O(log n) calls.
pub fn subtree_root<E>(
    start: u64,
    len: u64,
    perfect: &mut impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Hash, E> {
    if len.is_power_of_two() {
        let h = len.trailing_zeros();
        return perfect(h, start >> h);
    }
    let k = split(usize::try_from(len).unwrap_or(usize::MAX)) as u64;
    let left = subtree_root(start, k, perfect)?;
    let right = subtree_root(start + k, len - k, perfect)?;
    Ok(node_hash(&left, &right))
}

/// Inclusion proof of leaf `index` in the tree of `size` leaves, through
/// `perfect` (see [`subtree_root`]): O(log² n) calls instead of reading
/// every leaf.
pub fn inclusion_proof_with<E>(
    index: u64,
    size: u64,
    perfect: &mut impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Option<Vec<Hash>>, E> {
    if index >= size {
        return Ok(None);
    }
    let mut out = Vec::new();
    // Walk down from the whole tree, collecting sibling roots bottom-up.
    let (mut start, mut len, mut m) = (0u64, size, index);
    let mut stack = Vec::new();
    while len > 1 {
        let k = split(usize::try_from(len).unwrap_or(usize::MAX)) as u64;
        if m < k {
            stack.push((start + k, len - k));
            len = k;
        } else {
            stack.push((start, k));
            start += k;
            len -= k;
            m -= k;
        }
    }
    while let Some((s, l)) = stack.pop() {
        out.push(subtree_root(s, l, perfect)?);
    }
    Ok(Some(out))
}

/// The roots of the perfect subtrees of the tree so far, largest first:
/// appending is amortized O(1) and the root O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (height, hash) of each perfect subtree, left to right.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf (already leaf-hashed). Returns the perfect subtrees
    /// it completed, as (height ≥ 1, index at that height, hash), so they
    /// can be stored for O(log² n) proofs.
    pub fn push(&mut self, leaf: Hash) -> Vec<(u32, u64, Hash)> {
        let index = self.size;
        let mut made = Vec::new();
        let mut node = (0u32, leaf);
        while let Some(&(h, left)) = self.nodes.last() {
            if h != node.0 {
                break;
            }
            self.nodes.pop();
            node = (h + 1, node_hash(&left, &node.1));
            made.push((h + 1, index >> (h + 1), node.1));
        }
        self.nodes.push(node);
        self.size += 1;
        made
    }

    /// The root of the tree so far.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&Sha256::digest(i.to_be_bytes()).into()))
            .collect()
    }

    #[test]
    fn frontier_root_equals_the_recursive_definition() {
        let mut f = Frontier::default();
        assert_eq!(f.root(), empty_root());
        let all = leaves(70);
        for (i, l) in all.iter().enumerate() {
            f.push(*l);
            assert_eq!(f.root(), root(&all[..=i]), "size {}", i + 1);
        }
    }

    #[test]
    fn inclusion_proofs_verify_and_fail_when_anything_changes() {
        for n in 1..40 {
            let all = leaves(n);
            let r = root(&all);
            for i in 0..n {
                let p = inclusion_proof(&all, i).unwrap();
                assert!(
                    verify_inclusion(&all[i], i as u64, n as u64, &p, &r),
                    "n {n} i {i}"
                );
                assert!(!verify_inclusion(&all[(i + 1) % n], i as u64, n as u64, &p, &r) || n == 1);
                if !p.is_empty() {
                    let mut bad = p.clone();
                    bad[0][0] ^= 1;
                    assert!(!verify_inclusion(&all[i], i as u64, n as u64, &bad, &r));
                }
                let mut other = r;
                other[31] ^= 1;
                assert!(!verify_inclusion(&all[i], i as u64, n as u64, &p, &other));
            }
            assert!(inclusion_proof(&all, n).is_none());
        }
    }

    #[test]
    fn proofs_from_stored_perfect_subtrees_equal_proofs_from_all_leaves() {
        use std::collections::HashMap;
        let all = leaves(77);
        let mut f = Frontier::default();
        let mut stored: HashMap<(u32, u64), Hash> = HashMap::new();
        for l in &all {
            for (h, i, hash) in f.push(*l) {
                stored.insert((h, i), hash);
            }
        }
        let mut perfect = |h: u32, i: u64| -> Result<Hash, ()> {
            if h == 0 {
                Ok(all[i as usize])
            } else {
                stored.get(&(h, i)).copied().ok_or(())
            }
        };
        for n in 1..=77u64 {
            assert_eq!(
                subtree_root(0, n, &mut perfect).unwrap(),
                root(&all[..n as usize])
            );
            for i in 0..n {
                let p = inclusion_proof_with(i, n, &mut perfect).unwrap().unwrap();
                assert_eq!(
                    p,
                    inclusion_proof(&all[..n as usize], i as usize).unwrap(),
                    "n {n} i {i}"
                );
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_and_fail_for_other_histories() {
        for n in 1..34 {
            let all = leaves(n);
            for m in 1..=n {
                let p = consistency_proof(&all, m).unwrap();
                let (r1, r2) = (root(&all[..m]), root(&all));
                assert!(
                    verify_consistency(m as u64, n as u64, &p, &r1, &r2),
                    "m {m} n {n}"
                );
                let mut forked = all.clone();
                forked[m - 1][0] ^= 1;
                assert!(!verify_consistency(
                    m as u64,
                    n as u64,
                    &p,
                    &root(&forked[..m]),
                    &r2
                ));
            }
        }
    }
}
