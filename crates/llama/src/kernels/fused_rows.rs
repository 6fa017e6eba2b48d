//! Several projections of the same few input rows in one parallel loop: a decode step's query,
//! key and value projections, or its gate and up projections.
//!
//! Each projection alone is a parallel loop over its weight rows ([`skinny::by_weight_rows`]),
//! and a 2-core decode step of a small model is short enough that waking the other thread and
//! waiting for it costs as much as a projection. One loop over all the rows of the group pays
//! that once, and 8 or 4-bit weights share one rounding of the input. Every output is computed
//! by the same kernel call as alone, so it has the same bits.

use super::quant_rows::{QuantRows, RoundedInput};
use super::skinny;

/// A weight of a group: a quantised one, or a dense row-major f32 `[n, k]`.
pub(crate) enum GroupWeight<'a> {
    Blocks(&'a QuantRows),
    Dense { values: &'a [f32], rows: usize },
}

impl GroupWeight<'_> {
    fn rows(&self) -> usize {
        match self {
            GroupWeight::Blocks(b) => b.rows(),
            GroupWeight::Dense { rows, .. } => *rows,
        }
    }
}

/// `x [m, k] @ W^T` as `[m, n]` for each weight of `weights` (each `k` columns).
pub(crate) fn matmul_t_group(
    weights: &[GroupWeight<'_>],
    x: &[f32],
    m: usize,
    k: usize,
) -> Vec<Vec<f32>> {
    assert_eq!(x.len(), m * k, "{m} rows of {k} values");
    for w in weights {
        match w {
            GroupWeight::Blocks(b) => assert_eq!(b.cols(), k, "a weight of {k} columns"),
            GroupWeight::Dense { values, rows } => {
                assert_eq!(values.len(), rows * k, "a [{rows}, {k}] weight")
            }
        }
    }
    let rounded = weights
        .iter()
        .any(|w| matches!(w, GroupWeight::Blocks(_)))
        .then(|| RoundedInput::new(x, m, k));
    let ns: Vec<usize> = weights.iter().map(GroupWeight::rows).collect();
    skinny::by_weight_rows_group(m, &ns, |w, first, rows, out_t| match &weights[w] {
        GroupWeight::Blocks(b) => {
            let rounded = rounded.as_ref().expect("rounded for blocks");
            b.dot_rows(rounded, first, rows, out_t)
        }
        GroupWeight::Dense { values, .. } => {
            skinny::dot_rows(x, m, &values[first * k..(first + rows) * k], k, out_t)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant_rows::QuantFormat;
    use crate::kernels::skinny::tests::values;

    /// Each output the bits of its weight's own product, for quantised weights of different
    /// formats and dense ones in one group, one input row and several.
    #[test]
    fn a_group_gives_each_weight_the_bits_of_its_own_product() {
        let k = 100;
        let blocks: Vec<QuantRows> = [
            (QuantFormat::Int4Min, 37),
            (QuantFormat::Int8, 5),
            (QuantFormat::Int8Halves, 64),
            (QuantFormat::Int4, 1),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(format, n))| QuantRows::new(format, &values(n * k, 20 + i as u32), n, k))
        .collect();
        let dense = [values(19 * k, 40), values(3 * k, 41)];
        let mut group: Vec<GroupWeight> = blocks.iter().map(GroupWeight::Blocks).collect();
        group.insert(
            1,
            GroupWeight::Dense {
                values: &dense[0],
                rows: 19,
            },
        );
        group.push(GroupWeight::Dense {
            values: &dense[1],
            rows: 3,
        });
        for m in [1, 3, 16] {
            let x = values(m * k, 30 + m as u32);
            let got = matmul_t_group(&group, &x, m, k);
            assert_eq!(got.len(), group.len());
            for (w, got) in group.iter().zip(&got) {
                let alone = match w {
                    GroupWeight::Blocks(b) => b.matmul_t(&x, m),
                    GroupWeight::Dense { values, rows } => {
                        skinny::matmul_t(&x, m, values, *rows, k)
                    }
                };
                assert_eq!(got.len(), alone.len());
                for (g, a) in got.iter().zip(&alone) {
                    assert_eq!(g.to_bits(), a.to_bits(), "m={m}");
                }
            }
        }
    }
}
