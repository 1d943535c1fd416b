//! The Merkle tree of RFC 9162 §2.1 over the log's record hashes: the tree head a
//! checkpoint signs, inclusion proofs (§2.1.3) and consistency proofs (§2.1.4).
//!
//! Leaves are the SHA-256 hashes of the entries' canonical bytes; a leaf's hash is
//! `SHA-256(0x00 || leaf)`, an inner node's `SHA-256(0x01 || left || right)`.
use sha2::{block_api::compress256, Digest, Sha256};

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// A hash as the 64 lowercase hex digits the log writes (table lookup: the verifier
/// compares one per entry).
pub fn hex32(hash: &Hash) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in hash.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 15)];
    }
    out
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// SHA-256's initial hash value (FIPS 180-4 §5.3.3).
const IV: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// SHA-256 of a message of fixed length, given as its padded blocks (FIPS 180-4 §5.1.1),
/// compressed directly: the leaf and node hashes are one and two blocks, where the
/// general hasher's buffering costs as much as the compression (one of each per record).
fn digest_blocks(blocks: &[[u8; 64]]) -> Hash {
    let mut state = IV;
    compress256(&mut state, blocks);
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// The hash of a leaf: `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &Hash) -> Hash {
    // 33 bytes: 0x00, the leaf, the 0x80 end mark, zeros, the length in bits.
    let mut block = [0u8; 64];
    block[1..33].copy_from_slice(leaf);
    block[33] = 0x80;
    block[56..].copy_from_slice(&(33u64 * 8).to_be_bytes());
    digest_blocks(&[block])
}

/// The hash of an inner node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    // 65 bytes over two blocks: 0x01, left, right; then the end mark, zeros, the length.
    let mut blocks = [[0u8; 64]; 2];
    blocks[0][0] = 1;
    blocks[0][1..33].copy_from_slice(left);
    blocks[0][33..].copy_from_slice(&right[..31]);
    blocks[1][0] = right[31];
    blocks[1][1] = 0x80;
    blocks[1][56..].copy_from_slice(&(65u64 * 8).to_be_bytes());
    digest_blocks(&blocks)
}

/// The largest power of two smaller than `n` (`n` > 1).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// MTH(D[n]) over leaf hashes (already hashed with [`leaf_hash`]); the empty tree's
/// root is SHA-256 of nothing.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => sha256(&[]),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]): the inclusion proof of leaf `index` in the tree of `leaves`.
/// `None` when `index` is not in the tree.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    path(index, leaves, &mut proof);
    Some(proof)
}

fn path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &leaves[..k], out);
        out.push(root(&leaves[k..]));
    } else {
        path(m - k, &leaves[k..], out);
        out.push(root(&leaves[..k]));
    }
}

/// PROOF(m, D[n]): the consistency proof between the tree of the first `old_size`
/// leaves and the tree of all `leaves`. `None` when `old_size` exceeds the tree.
pub fn consistency_proof(old_size: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    if old_size > leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    if old_size > 0 {
        subproof(old_size, leaves, true, &mut proof);
    }
    Some(proof)
}

fn subproof(m: usize, leaves: &[Hash], whole: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !whole {
            out.push(root(leaves));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &leaves[..k], whole, out);
        out.push(root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, out);
        out.push(root(&leaves[..k]));
    }
}

/// Right-shifts both until `fn_` is odd or 0 (a step of both RFC 9162 verifications).
fn shift_to_odd(fn_: &mut u64, sn: &mut u64) {
    while *fn_ & 1 == 0 && *fn_ != 0 {
        *fn_ >>= 1;
        *sn >>= 1;
    }
}

/// RFC 9162 §2.1.3.2: whether `proof` shows the leaf hash `leaf` at `index` in the tree
/// of `size` leaves whose root is `root`.
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            shift_to_odd(&mut fn_, &mut sn);
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

/// RFC 9162 §2.1.4.2: whether `proof` shows that the tree of `new_size` leaves with root
/// `new_root` extends the tree of `old_size` leaves with root `old_root`.
pub fn verify_consistency(old_size: u64, new_size: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> bool {
    if old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    if old_size == 0 {
        // Every tree extends the empty one.
        return proof.is_empty();
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            shift_to_odd(&mut fn_, &mut sn);
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    fr == *old_root && sr == *new_root && sn == 0
}

/// The tree kept as its perfect subtrees, left to right: appending is one node hash
/// per leaf on average, and the root at any size costs `log n` hashes (the writer and the
/// verifier check every checkpoint without keeping the leaves).
#[derive(Debug, Clone, Default)]
pub struct CompactTree {
    /// (root, leaf count) of each perfect subtree, sizes strictly decreasing.
    stack: Vec<(Hash, u64)>,
    size: u64,
}

impl CompactTree {
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (leaf, 1u64);
        while let Some(&(left, size)) = self.stack.last() {
            if size != node.1 {
                break;
            }
            self.stack.pop();
            node = (node_hash(&left, &node.0), size * 2);
        }
        self.stack.push(node);
        self.size += 1;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// MTH of the leaves pushed so far: the subtrees folded from the right.
    pub fn root(&self) -> Hash {
        let mut iter = self.stack.iter().rev();
        let Some(&(mut acc, _)) = iter.next() else { return sha256(&[]) };
        for (left, _) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&sha256(&(i as u64).to_le_bytes()))).collect()
    }

    #[test]
    fn the_empty_tree_and_one_leaf_follow_the_rfc() {
        // RFC 9162 §2.1.1: MTH({}) = SHA-256(), MTH({d0}) = SHA-256(0x00 || d0).
        assert_eq!(hex::encode(root(&[])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let l = leaves(1);
        assert_eq!(root(&l), l[0]);
    }

    #[test]
    fn leaf_and_node_hashes_are_sha256_of_their_prefixed_bytes() {
        for seed in 0u64..50 {
            let a = sha256(&seed.to_le_bytes());
            let b = sha256(&(seed + 1000).to_be_bytes());
            let mut leaf = vec![0u8];
            leaf.extend_from_slice(&a);
            assert_eq!(leaf_hash(&a), sha256(&leaf));
            let mut node = vec![1u8];
            node.extend_from_slice(&a);
            node.extend_from_slice(&b);
            assert_eq!(node_hash(&a, &b), sha256(&node));
        }
        // Known values (Python's hashlib): SHA-256 of 0x00 and 32 zero bytes, of 0x01 and 64.
        assert_eq!(
            hex::encode(leaf_hash(&[0; 32])),
            "7f9c9e31ac8256ca2f258583df262dbc7d6f68f2a03043d5c99a4ae5a7396ce9"
        );
        assert_eq!(
            hex::encode(node_hash(&[0; 32], &[0; 32])),
            "ae0798d0ecaed2b778eddebf18f071a561c53658c05e76cedecc27cafbdbc577"
        );
    }

    #[test]
    fn hex32_is_lowercase_hex() {
        let h = sha256(b"abc");
        assert_eq!(&hex32(&h)[..], hex::encode(h).as_bytes());
    }

    #[test]
    fn a_three_leaf_tree_splits_at_two() {
        let l = leaves(3);
        assert_eq!(root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
        // The RFC's example: the proof for d2 (index 2) in a 3-leaf tree is [hash(d0,d1)].
        assert_eq!(inclusion_proof(2, &l).unwrap(), vec![node_hash(&l[0], &l[1])]);
        // The consistency proof from 2 to 3 leaves is [c] (old size a power of two: its root is implied).
        assert_eq!(consistency_proof(2, &l).unwrap(), vec![l[2]]);
    }

    #[test]
    fn the_rfc_seven_leaf_examples() {
        // RFC 9162 §2.1.5 (tree of d0..d6 with inner nodes a..l).
        let l = leaves(7);
        let (a, b, c, d, e, f) = (l[0], l[1], l[2], l[3], l[4], l[5]);
        let (g, h, i) = (node_hash(&a, &b), node_hash(&c, &d), node_hash(&e, &f));
        let (j, dd) = (l[6], l[6]);
        let k = node_hash(&g, &h);
        let lnode = node_hash(&i, &j);
        assert_eq!(root(&l), node_hash(&k, &lnode));
        // The inclusion proof for b is [a, h, l]; for d0 [b, h, l]; for d3 [c, g, l]; for d4 [f, j, k].
        assert_eq!(inclusion_proof(1, &l).unwrap(), vec![a, h, lnode]);
        assert_eq!(inclusion_proof(3, &l).unwrap(), vec![c, g, lnode]);
        assert_eq!(inclusion_proof(4, &l).unwrap(), vec![f, dd, k]);
        assert_eq!(inclusion_proof(6, &l).unwrap(), vec![i, k]);
        // Consistency: between hash0 (3 leaves) and hash (7): [c, d, g, l].
        assert_eq!(consistency_proof(3, &l).unwrap(), vec![c, d, g, lnode]);
        // Between 4 and 7: [l]. Between 6 and 7: [i, j, k].
        assert_eq!(consistency_proof(4, &l).unwrap(), vec![lnode]);
        assert_eq!(consistency_proof(6, &l).unwrap(), vec![i, j, k]);
    }

    #[test]
    fn every_proof_of_small_trees_verifies_and_a_wrong_one_does_not() {
        for n in 1..=70usize {
            let l = leaves(n);
            let r = root(&l);
            for m in 0..n {
                let p = inclusion_proof(m, &l).unwrap();
                assert!(verify_inclusion(m as u64, n as u64, &l[m], &p, &r), "incl {m}/{n}");
                assert!(!verify_inclusion(m as u64, n as u64, &sha256(b"x"), &p, &r));
                if n > 1 {
                    assert!(!verify_inclusion(((m + 1) % n) as u64, n as u64, &l[m], &p, &r), "wrong index {m}/{n}");
                }
            }
            for m in 0..=n {
                let p = consistency_proof(m, &l).unwrap();
                let old = root(&l[..m]);
                assert!(verify_consistency(m as u64, n as u64, &old, &r, &p), "cons {m}/{n}");
                if m > 0 && m < n {
                    assert!(!verify_consistency(m as u64, n as u64, &sha256(b"x"), &r, &p), "old root {m}/{n}");
                    assert!(!verify_consistency(m as u64, n as u64, &old, &sha256(b"x"), &p), "new root {m}/{n}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn the_compact_tree_agrees_with_the_recursive_root(n in 0usize..600) {
            let l = leaves(n);
            let mut tree = CompactTree::default();
            for leaf in &l {
                tree.push(*leaf);
            }
            prop_assert_eq!(tree.root(), root(&l));
            prop_assert_eq!(tree.size(), n as u64);
        }

        #[test]
        fn proofs_verify_over_many_tree_sizes(n in 1usize..1500, pick in any::<u64>(), pick2 in any::<u64>()) {
            let l = leaves(n);
            let r = root(&l);
            let m = (pick % n as u64) as usize;
            let p = inclusion_proof(m, &l).unwrap();
            prop_assert!(verify_inclusion(m as u64, n as u64, &l[m], &p, &r));
            let old = (pick2 % (n as u64 + 1)) as usize;
            let c = consistency_proof(old, &l).unwrap();
            prop_assert!(verify_consistency(old as u64, n as u64, &root(&l[..old]), &r, &c));
        }

        #[test]
        fn a_rewritten_leaf_before_the_old_size_breaks_consistency(n in 2usize..800, pick in any::<u64>(), at in any::<u64>()) {
            let l = leaves(n);
            let old = 1 + (pick % (n as u64 - 1)) as usize;
            let old_root = root(&l[..old]);
            let mut rewritten = l.clone();
            let i = (at % old as u64) as usize;
            rewritten[i] = sha256(b"rewritten");
            let c = consistency_proof(old, &rewritten).unwrap();
            prop_assert!(!verify_consistency(old as u64, n as u64, &old_root, &root(&rewritten), &c));
        }
    }
}
