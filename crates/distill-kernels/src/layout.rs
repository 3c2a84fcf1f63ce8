//! Tensor layouts that burn's strict contiguity check turns away.

/// The row-major (compact) strides of `shape`, if a tensor of that shape and these strides
/// is laid out so: every dimension of size above 1 has its compact stride. A size-1
/// dimension's stride addresses nothing, but `swap_dims` and `reshape` leave other values
/// there (a decode step's [B, 1, H, hd] out of [B, H, 1, hd]), and burn's `is_contiguous`
/// then calls the tensor strided: its `reshape` and `into_contiguous` copy it. Rewriting the
/// strides to these is free and changes no element's address.
pub fn compact_up_to_unit_dims(shape: &[usize], strides: &[usize]) -> Option<Vec<usize>> {
    let mut compact = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        compact[i] = compact[i + 1] * shape[i + 1];
    }
    let same = shape.len() == strides.len()
        && shape
            .iter()
            .zip(strides.iter().zip(&compact))
            .all(|(&d, (&s, &c))| d == 1 || s == c);
    same.then_some(compact)
}

#[cfg(test)]
mod tests {
    use super::compact_up_to_unit_dims as compact;

    #[test]
    fn only_the_strides_of_size_one_dimensions_may_differ() {
        // swap_dims(1, 2) of a contiguous [2, 14, 1, 64]: [2, 1, 14, 64] with strides
        // [896, 64, 64, 1], the same memory as a contiguous [2, 1, 14, 64].
        assert_eq!(
            compact(&[2, 1, 14, 64], &[896, 64, 64, 1]),
            Some(vec![896, 896, 64, 1])
        );
        assert_eq!(compact(&[1, 896], &[64, 1]), Some(vec![896, 1]));
        assert_eq!(compact(&[1, 1, 1], &[7, 3, 5]), Some(vec![1, 1, 1]));
        assert_eq!(compact(&[], &[]), Some(vec![]));
        // A real transpose, a row-strided view (a column slice), a broadcast: not compact.
        assert_eq!(compact(&[2, 14, 1, 64], &[896, 1, 64, 14]), None);
        assert_eq!(compact(&[1, 4, 896], &[7168, 1792, 1]), None);
        assert_eq!(compact(&[3, 896], &[0, 1]), None);
        assert_eq!(compact(&[2, 3], &[3]), None);
    }
}
