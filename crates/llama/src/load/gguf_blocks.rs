//! A GGUF file's quantised weights kept as stored (`--quantize gguf`), for the decode kernels
//! of [`crate::kernels::quant_rows`].
//!
//! Q8_0, Q4_0 and Q4_1 are blocks of 32 values with an f16 scale (and for Q4_1 an f16
//! minimum): they become [`QuantRows`] as they are, the f16 values widened to f32 (exact).
//! Q5_0's 5-bit integers (`q - 16`) are widened to a byte each (Int8, same scale).
//! Q4_K is a super-block of 256 values: eight sub-blocks of 32 with 6-bit scales `sc` and
//! minima `m` under the f16 `d` and `dmin`, each value `d * sc * q - dmin * m`. That is the
//! Q4_1 form per sub-block, with scale `d * sc` and minimum `-(dmin * m)`, both exact in f32
//! (11 bits of mantissa times 6): the weights are the file's to the last bit. Q6_K's 256 values
//! are sixteen sub-blocks of 16 with an 8-bit scale each under `d`: a byte per value (`q - 32`)
//! with a scale per half block (Int8Halves, `d * sc` exact). Any other type has no kernel here;
//! its tensor is dequantised (the caller says so).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::{LlamaError, Result};
use crate::kernels::quant_rows::{QuantFormat, QuantRows, BLOCK};
use crate::load::weights::{gguf_name, unpermute, GgufWeights};

/// A tensor of the file as the decode kernels can hold it, or why it cannot be.
pub(crate) enum Stored {
    Rows(QuantRows),
    /// A type without a kernel here (F32, F16, Q6_K, ...).
    NoKernel(GgmlDType),
}

impl GgufWeights {
    /// The tensor for `hf_name` as stored, its rows in Hugging Face order (Q and K rows
    /// un-permuted as [`GgufWeights`] does for dense weights).
    pub(crate) fn stored(&self, hf_name: &str) -> Result<Stored> {
        let gguf = gguf_name(hf_name)
            .ok_or_else(|| self.gguf_error(format!("no GGUF name for `{hf_name}`")))?;
        let mut file =
            std::fs::File::open(&self.path).map_err(|e| LlamaError::io(&self.path, e))?;
        let q = self
            .content
            .tensor(&mut file, &gguf, &Device::Cpu)
            .map_err(|e| self.gguf_error(format!("tensor `{gguf}`: {e}")))?;
        let Some(rows) =
            rows_of(&q).map_err(|e| self.gguf_error(format!("tensor `{gguf}`: {e}")))?
        else {
            return Ok(Stored::NoKernel(q.dtype()));
        };
        let heads = if gguf.ends_with("attn_q.weight") {
            Some(self.n_heads)
        } else if gguf.ends_with("attn_k.weight") {
            Some(self.n_kv_heads)
        } else {
            None
        };
        Ok(Stored::Rows(match heads {
            Some(h) => hf_row_order(rows, h)?,
            None => rows,
        }))
    }

    fn gguf_error(&self, message: String) -> LlamaError {
        LlamaError::Gguf {
            path: self.path.clone(),
            message,
        }
    }
}

/// The blocks of a 2-d quantised tensor as [`QuantRows`], or `None` for a type without a
/// kernel. Errors on a shape or a byte count that does not fit the type.
pub(crate) fn rows_of(q: &QTensor) -> std::result::Result<Option<QuantRows>, String> {
    let dtype = q.dtype();
    let (format, per_block) = match dtype {
        GgmlDType::Q8_0 => (QuantFormat::Int8, 34),
        GgmlDType::Q4_0 => (QuantFormat::Int4, 18),
        GgmlDType::Q4_1 => (QuantFormat::Int4Min, 20),
        GgmlDType::Q4K => (QuantFormat::Int4Min, 144),
        GgmlDType::Q5_0 => (QuantFormat::Int8, 22),
        GgmlDType::Q6K => (QuantFormat::Int8Halves, 210),
        _ => return Ok(None),
    };
    let dims = q.shape().dims();
    let &[n, k] = dims else {
        return Err(format!(
            "a {dtype:?} tensor of shape {dims:?}, not a matrix"
        ));
    };
    let values_per_block = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) {
        256
    } else {
        BLOCK
    };
    if k % values_per_block != 0 {
        return Err(format!("rows of {k} values are not whole {dtype:?} blocks"));
    }
    let data = q.data().map_err(|e| e.to_string())?;
    let stored_blocks = n * k / values_per_block;
    if data.len() != stored_blocks * per_block {
        return Err(format!(
            "{} bytes for {stored_blocks} {dtype:?} blocks of {per_block}",
            data.len()
        ));
    }
    let blocks = n * k / BLOCK;
    let mut scales = Vec::with_capacity(blocks * format.scales_per_block());
    let mut mins = Vec::new();
    let mut bytes = Vec::with_capacity(blocks * format.bytes_per_block());
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    for block in data.chunks_exact(per_block) {
        match dtype {
            GgmlDType::Q8_0 | GgmlDType::Q4_0 => {
                // Q4_0 packs value i and i + 16 in byte i, as Int4 does.
                scales.push(half(block));
                bytes.extend_from_slice(&block[2..]);
            }
            GgmlDType::Q4_1 => {
                scales.push(half(block));
                mins.push(half(&block[2..]));
                bytes.extend_from_slice(&block[4..]);
            }
            GgmlDType::Q5_0 => {
                scales.push(half(block));
                bytes.extend(q5_0_values(block).map(|v| v as u8));
            }
            GgmlDType::Q6K => q6k_blocks(block, &mut scales, &mut bytes),
            _ => q4k_blocks(block, &mut scales, &mut mins, &mut bytes),
        }
    }
    Ok(Some(QuantRows::from_blocks(
        format, n, k, scales, mins, bytes,
    )))
}

/// One Q4_K super-block (`d`, `dmin`, 12 bytes of packed 6-bit scales and minima, 128 bytes of
/// nibbles) as eight Int4Min blocks. Values `64 g .. 64 g + 32` are the low nibbles of bytes
/// `32 g .. 32 g + 32` and the next 32 their high nibbles; Int4Min wants value `i` and
/// `i + 16` of a block in byte `i`.
fn q4k_blocks(block: &[u8], scales: &mut Vec<f32>, mins: &mut Vec<f32>, bytes: &mut Vec<u8>) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let packed: &[u8; 12] = block[4..16].try_into().expect("12 bytes of scales");
    let qs = &block[16..144];
    for sub in 0..8 {
        let (sc, m) = q4k_scale_min(sub, packed);
        scales.push(d * sc as f32);
        mins.push(-(dmin * m as f32));
        let group = &qs[32 * (sub / 2)..][..32];
        let nibble = |i: usize| {
            if sub % 2 == 0 {
                group[i] & 0x0F
            } else {
                group[i] >> 4
            }
        };
        bytes.extend((0..BLOCK / 2).map(|i| nibble(i) | nibble(i + BLOCK / 2) << 4));
    }
}

/// A Q5_0 block's 32 integers (`d`, four bytes of fifth bits, 16 bytes of nibbles): value `i`
/// is the low nibble of byte `i` and value `i + 16` its high nibble, each with bit `i` (or
/// `i + 16`) of the fifth bits on top, minus 16.
fn q5_0_values(block: &[u8]) -> impl Iterator<Item = i8> + '_ {
    let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let qs = &block[6..22];
    (0..BLOCK).map(move |p| {
        let nibble = if p < 16 {
            qs[p] & 0x0F
        } else {
            qs[p - 16] >> 4
        };
        let fifth = ((high >> p) & 1) as u8;
        (nibble | fifth << 4) as i8 - 16
    })
}

/// One Q6_K super-block (128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales,
/// `d`) as eight Int8Halves blocks. In each half of 128 values, value `l + 32 i` (`i` in
/// 0..4, `l` in 0..32) takes its low four bits from byte `l` (i even) or `l + 32` (i odd) of
/// the half's 64 low-nibble bytes (the low nibble for i < 2, the high one after), and its two
/// high bits from bits `2 i` of byte `l` of the half's 32 high-bit bytes; minus 32.
fn q6k_blocks(block: &[u8], scales: &mut Vec<f32>, bytes: &mut Vec<u8>) {
    let (ql, qh, sc) = (&block[..128], &block[128..192], &block[192..208]);
    let d = f16::from_le_bytes([block[208], block[209]]).to_f32();
    let mut q = [0i8; 256];
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..][..64], &qh[32 * half..][..32]);
        for l in 0..32 {
            for i in 0..4 {
                let low = ql[l + 32 * (i % 2)];
                let low = if i < 2 { low & 0x0F } else { low >> 4 };
                let high = (qh[l] >> (2 * i)) & 3;
                q[128 * half + 32 * i + l] = (low | high << 4) as i8 - 32;
            }
        }
    }
    for sub in sc {
        scales.push(d * *sub as i8 as f32);
    }
    bytes.extend(q.iter().map(|&v| v as u8));
}

/// Sub-block `j`'s 6-bit scale and minimum from Q4_K's 12 packed bytes: for `j < 4` the low
/// six bits of bytes `j` and `j + 4`; for the others four bits of byte `j + 4` (low for the
/// scale, high for the minimum) under the top two bits of bytes `j - 4` and `j`.
fn q4k_scale_min(j: usize, packed: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// `rows` (a Q or K projection in llama.cpp's interleaved rotary order) with its rows put back
/// in Hugging Face order, by the same permutation [`unpermute`] applies to dense weights.
fn hf_row_order(rows: QuantRows, n_heads: usize) -> Result<QuantRows> {
    let n = rows.rows();
    let index = Tensor::arange(0u32, n as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let order: Vec<usize> = unpermute(&index, n_heads)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect();
    Ok(rows.with_rows_in_order(&order))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(n: usize, k: usize, seed: u32) -> Tensor {
        let values = crate::kernels::skinny::tests::values(n * k, seed);
        Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap()
    }

    /// Each type with a kernel, quantised by candle (ggml's rounding), holds exactly the values
    /// candle dequantises it to; a type without one is reported as such.
    #[test]
    fn stored_blocks_hold_the_files_values_to_the_bit() {
        let w = weight(6, 512, 1);
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q5_0,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want = ggml_values(&q);
            let rows = rows_of(&q).unwrap().expect("a kernel");
            let got = rows.dequantize();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{dtype:?} [{i}]: {g} vs {w}");
            }
        }
        let q5k = QTensor::quantize(&w, GgmlDType::Q5K).unwrap();
        assert!(rows_of(&q5k).unwrap().is_none());
    }

    /// The values candle (ggml's dequantisers) gives a quantised tensor.
    fn ggml_values(q: &QTensor) -> Vec<f32> {
        let t = q.dequantize(&Device::Cpu).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Every bit of a super-block's packing reached: blocks of arbitrary bytes (not a
    /// quantiser's output: all scales and minima different, negative Q6_K scales), with a
    /// finite `d` (and `dmin`), dequantise as candle does.
    #[test]
    fn k_quant_blocks_of_any_bytes_unpack_as_ggml_does() {
        for (dtype, size, halves) in [
            (GgmlDType::Q4K, 144, [0, 2]),
            (GgmlDType::Q6K, 210, [208, 208]),
        ] {
            let mut block: Vec<u8> = (0..size)
                .map(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
                .collect();
            block[halves[0]..halves[0] + 2].copy_from_slice(&f16::from_f32(0.03125).to_le_bytes());
            if halves[1] != halves[0] {
                block[halves[1]..halves[1] + 2].copy_from_slice(&f16::from_f32(-0.5).to_le_bytes());
            }
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(&block),
                &Device::Cpu,
                dtype,
            )
            .unwrap();
            let q = QTensor::new(storage, (1, 256)).unwrap();
            let got = rows_of(&q).unwrap().unwrap().dequantize();
            assert_eq!(got, ggml_values(&q), "{dtype:?}");
        }
    }

    #[test]
    fn a_tensor_that_is_not_a_matrix_is_an_error() {
        let v = Tensor::from_vec(
            crate::kernels::skinny::tests::values(64, 3),
            64,
            &Device::Cpu,
        )
        .unwrap();
        let q = QTensor::quantize(&v, GgmlDType::Q4_0).unwrap();
        let err = rows_of(&q).expect_err("an error");
        assert!(err.contains("not a matrix"), "{err}");
    }
}
