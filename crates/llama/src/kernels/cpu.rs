//! Helpers of the training ops' CPU loops: the dtype they compute in, candle's own scalar
//! kernels, row-parallel loops and storage access.

use candle_core::backend::BackendStorage;
use candle_core::op::{Exp, Sqrt, UnaryOpT};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor, WithDType};

/// A gradient as a backward returns it: detached. The tensor ops of a backward record a graph
/// whenever an operand is tracked (`q`, `k`, a `Var`...), and candle stores the gradient of a
/// `Var` as returned: without this, the gradient of a LoRA factor would keep its whole
/// computation (the scores' gradient, the dropout mask, the scaled output gradient) alive
/// until the gradients are dropped.
pub(super) fn grad_of(t: Tensor) -> Option<Tensor> {
    Some(t.detach())
}

/// The precision a half-precision tensor is upcast to for softmax and normalisation.
pub(super) fn upcast(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// f32 and f64, the precisions the softmax and the normalisation run in, with candle's own
/// scalar kernels (so the results are bit-identical to its unary ops).
pub(super) trait Float: WithDType {
    fn exp_(self) -> Self;
    fn sqrt_(self) -> Self;
}

impl Float for f32 {
    fn exp_(self) -> f32 {
        <Exp as UnaryOpT>::f32(self)
    }
    fn sqrt_(self) -> f32 {
        <Sqrt as UnaryOpT>::f32(self)
    }
}

impl Float for f64 {
    fn exp_(self) -> f64 {
        <Exp as UnaryOpT>::f64(self)
    }
    fn sqrt_(self) -> f64 {
        <Sqrt as UnaryOpT>::f64(self)
    }
}

/// Runs `f(row_index, row)` on every `row_len`-long row of `data`, split over candle's CPU
/// threads when there is enough work.
pub(super) fn par_rows<T: Send>(
    data: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if row_len == 0 || data.is_empty() {
        return;
    }
    let rows = data.len() / row_len;
    let threads = candle_core::utils::get_num_threads().min(rows);
    if threads <= 1 || data.len() < (1 << 15) {
        for (i, row) in data.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
        return;
    }
    let per_thread = rows.div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        for (c, chunk) in data.chunks_mut(per_thread * row_len).enumerate() {
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(c * per_thread + i, row);
                }
            });
        }
    });
}

/// Runs `$body` on the elements (`Vec<T>`, bound to `$v`) of a float storage and wraps them
/// back into a storage of the same dtype.
macro_rules! each_float {
    ($storage:expr, $what:literal, |$v:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(mut $v) => {
                $body;
                CpuStorage::F32($v)
            }
            CpuStorage::F64(mut $v) => {
                $body;
                CpuStorage::F64($v)
            }
            CpuStorage::BF16(mut $v) => {
                $body;
                CpuStorage::BF16($v)
            }
            CpuStorage::F16(mut $v) => {
                $body;
                CpuStorage::F16($v)
            }
            other => bail!("{}: unsupported dtype {:?}", $what, other.dtype()),
        }
    };
}
pub(super) use each_float;

/// The elements of a contiguous `layout` of `storage` as a slice.
pub(super) fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Some((from, to)) = layout.contiguous_offsets() else {
        bail!("{what} must be contiguous")
    };
    Ok(&T::cpu_storage_as_slice(storage)?[from..to])
}

/// A contiguous copy of `storage` under `layout`, in `dtype` (candle's own conversion).
pub(super) fn copy_as(storage: &CpuStorage, layout: &Layout, dtype: DType) -> Result<CpuStorage> {
    storage.to_dtype(layout, dtype)
}

pub(super) fn into_f32(s: CpuStorage) -> Result<Vec<f32>> {
    f32::cpu_storage_data(s)
}

pub(super) fn into_f64(s: CpuStorage) -> Result<Vec<f64>> {
    f64::cpu_storage_data(s)
}

/// `v * scale + 0`, exactly as candle's affine op rounds it in the dtype of `v`.
pub(super) fn scale_in_place<T: WithDType>(v: &mut [T], scale: f64) {
    let (mul, add) = (T::from_f64(scale), T::from_f64(0.0));
    for x in v.iter_mut() {
        *x = *x * mul + add;
    }
}

pub(super) fn mul_in_place<T: WithDType>(v: &mut [T], u: &[T]) {
    for (x, &u) in v.iter_mut().zip(u) {
        *x *= u;
    }
}

pub(super) fn add_in_place<T: WithDType>(v: &mut [T], u: &[T]) {
    for (x, &u) in v.iter_mut().zip(u) {
        *x += u;
    }
}

/// `dst [m, n] (+)= lhs [m, k] @ rhs [k, n]`, each operand given as (elements, row stride,
/// column stride), on `threads` threads (1: this thread only, for callers that parallelise
/// over blocks themselves).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    threads: usize,
) {
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= extent(m, n, dst_rs, 1));
    assert!(lhs.0.len() >= extent(m, k, lhs.1, lhs.2));
    assert!(rhs.0.len() >= extent(k, n, rhs.1, rhs.2));
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access of the three strided views in bounds, and
    // `dst` does not alias the operands (it is a distinct mutable borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
