//! NF4, QLoRA's 4-bit NormalFloat, for frozen base weights: each block of 64 consecutive
//! values of the HF-layout weight [out, in] is scaled by its absolute maximum and rounded to
//! the nearest of 16 levels placed at quantiles of N(0, 1) ([`CODEBOOK`]). 4.5 bits a weight
//! with the f32 scales, against 16 for bf16: a 7B model's linear layers take 3.4 GiB, not 12.2.
//!
//! Bit-compatible with bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64)` without
//! double quantization (what PEFT's QLoRA recipes load): the same levels, the same rounding
//! thresholds (bitsandbytes' `dQuantizeNF4`) and the same packing, two codes a byte with the
//! first in the high nibble. Here four such bytes make one i32 word (little-endian), because
//! burn's integer tensors hold i32 on CUDA. Dequantization is `level * absmax` in f32, rounded
//! once to the activations' dtype, as bitsandbytes does.

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use rayon::prelude::*;

/// Values per scale.
pub const BLOCK: usize = 64;

/// The 16 levels, ascending (bitsandbytes' `get_4bit_type("nf4")`).
pub const CODEBOOK: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The midpoints between neighbouring levels, ascending: a normalised value x gets the code
/// of how many of them it exceeds (bitsandbytes' decision tree, same f32 constants; at a
/// midpoint exactly, the lower level).
const THRESHOLDS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_4,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_4,
    0.642_786_9,
    0.861_478_4,
];

fn code(x: f32) -> u8 {
    THRESHOLDS.iter().filter(|&&t| x > t).count() as u8
}

/// A weight quantized on the host: bitsandbytes' packed bytes and one scale per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Two codes a byte, the earlier element in the high nibble; whole blocks, so the last
    /// block's tail past the weight's end is padding (code of 0.0 scaled: it is never read).
    pub packed: Vec<u8>,
    /// Each block's absolute maximum.
    pub absmax: Vec<f32>,
}

/// Quantizes `values` (a weight flattened in HF order) block by block, in parallel.
pub fn quantize(values: &[f32]) -> Quantized {
    let blocks = values.len().div_ceil(BLOCK);
    let mut packed = vec![0u8; blocks * BLOCK / 2];
    let mut absmax = vec![0f32; blocks];
    packed
        .par_chunks_mut(BLOCK / 2)
        .zip(absmax.par_iter_mut())
        .zip(values.par_chunks(BLOCK))
        .for_each(|((bytes, max), block)| {
            *max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            // bitsandbytes multiplies by the reciprocal; dividing would round some values
            // to the other side of a threshold. An all-zero block is all code 7 (0.0).
            let inv = if *max > 0.0 { 1.0 / *max } else { 0.0 };
            let mut codes = [code(0.0); BLOCK];
            for (c, v) in codes.iter_mut().zip(block) {
                *c = code(v * inv);
            }
            for (b, pair) in bytes.iter_mut().zip(codes.chunks(2)) {
                *b = (pair[0] << 4) | pair[1];
            }
        });
    Quantized { packed, absmax }
}

/// The values `q` stands for, the first `n`, in f32 (the reference the device paths match).
pub fn dequantize(q: &Quantized, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let byte = q.packed[i / 2];
            let c = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
            CODEBOOK[c as usize] * q.absmax[i / BLOCK]
        })
        .collect()
}

/// A frozen weight held in NF4 on the device. Its parameters carry no gradient.
#[derive(Module, Debug)]
pub struct Nf4<B: Backend> {
    /// [`Quantized::packed`] four bytes to a little-endian word: [blocks * 8].
    pub codes: Param<Tensor<B, 1, Int>>,
    /// f32 [blocks].
    pub absmax: Param<Tensor<B, 1>>,
    /// The weight's HF shape [out, in].
    #[module(skip)]
    pub shape: [usize; 2],
}

/// An [`Nf4`]'s tensors, as ops take them (no parameters, any backend).
#[derive(Debug, Clone)]
pub struct Nf4Tensor<B: Backend> {
    pub codes: Tensor<B, 1, Int>,
    pub absmax: Tensor<B, 1>,
    /// HF [out, in].
    pub shape: [usize; 2],
}

impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    Nf4Tensor<burn::backend::Autodiff<B, C>>
{
    /// The same tensors on the inner backend (they carry no gradient).
    pub fn inner(&self) -> Nf4Tensor<B> {
        Nf4Tensor {
            codes: self.codes.clone().inner(),
            absmax: self.absmax.clone().inner(),
            shape: self.shape,
        }
    }
}

impl<B: Backend> Nf4<B> {
    /// Quantizes `values`, an HF-layout weight [out, in] flattened, onto `device`.
    pub fn quantize(values: &[f32], shape: [usize; 2], device: &B::Device) -> Self {
        assert_eq!(values.len(), shape[0] * shape[1], "NF4: {shape:?} weight");
        let q = quantize(values);
        let words: Vec<i32> = q
            .packed
            .chunks(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (n_words, blocks) = (words.len(), q.absmax.len());
        Nf4 {
            codes: Param::initialized(
                ParamId::new(),
                Tensor::from_data(TensorData::new(words, [n_words]), device),
            ),
            absmax: Param::from_tensor(Tensor::from_data(
                TensorData::new(q.absmax, [blocks]),
                (device, DType::F32),
            )),
            shape,
        }
    }

    pub fn tensor(&self) -> Nf4Tensor<B> {
        Nf4Tensor {
            codes: self.codes.val(),
            absmax: self.absmax.val(),
            shape: self.shape,
        }
    }

    /// burn layout [in, out], like a dense linear weight.
    pub fn dims(&self) -> [usize; 2] {
        [self.shape[1], self.shape[0]]
    }
}

/// Dequantization as burn ops: the HF-layout weight [out, in] in `dtype`. What backends
/// without a kernel for it run (the CPU, in tests).
pub fn dequantize_default<B: Backend>(w: &Nf4Tensor<B>, dtype: DType) -> Tensor<B, 2> {
    let [out, inp] = w.shape;
    let words = w.codes.dims()[0];
    let blocks = w.absmax.dims()[0];
    let device = w.codes.device();
    // Element 8w + k is in byte k / 2 of word w, in its high nibble when k is even.
    let shifts = Tensor::<B, 1, Int>::from_data(
        TensorData::new(vec![4i32, 0, 12, 8, 20, 16, 28, 24], [8]),
        &device,
    );
    let codes = w
        .codes
        .clone()
        .reshape([words, 1])
        .expand([words, 8])
        .bitwise_right_shift(shifts.reshape([1, 8]).expand([words, 8]))
        .bitwise_and_scalar(15.elem())
        .reshape([words * 8]);
    let levels = Tensor::<B, 1>::from_data(TensorData::new(CODEBOOK.to_vec(), [16]), (&device, DType::F32));
    let values = levels.select(0, codes).reshape([blocks, BLOCK]) * w.absmax.clone().reshape([blocks, 1]);
    let values = values
        .reshape([blocks * BLOCK])
        .slice(0..out * inp)
        .reshape([out, inp]);
    crate::cast_to(values, dtype)
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    /// Each case's tensors from tests/fixtures/nf4 (bitsandbytes 0.50.2): raw bytes by name.
    fn reference() -> std::collections::HashMap<String, (Vec<usize>, Vec<u8>)> {
        let path = distill_core::testing::fixtures().join("nf4/reference.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, v)| (name, (v.shape().to_vec(), v.data().to_vec())))
            .collect()
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn quantization_matches_bitsandbytes() {
        let reference = reference();
        for case in ["normal", "partial"] {
            let get = |what: &str| reference[&format!("{case}.{what}")].clone();
            let (shape, weight) = get("weight");
            let weight = f32s(&weight);
            let q = quantize(&weight);
            let n = weight.len();
            // bitsandbytes keeps (n + 1) / 2 bytes; ours pads the last block.
            let want_packed = get("packed").1;
            let first_diff = (0..want_packed.len()).find(|&i| q.packed[i] != want_packed[i]);
            assert_eq!(first_diff, None, "{case}: codes");
            assert_eq!(q.absmax, f32s(&get("absmax").1), "{case}: scales");
            // bitsandbytes dequantizes to the weight's dtype, bf16: level * absmax in f32,
            // rounded once.
            let want = f32s(&get("dequantized").1);
            let ours = dequantize(&q, n);
            let rounded: Vec<f32> = ours.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
            assert!(rounded == want, "{case}: values");
            let device = Default::default();
            let w = Nf4::<Flex>::quantize(&weight, [shape[0], shape[1]], &device);
            let values = |dtype| {
                let t = dequantize_default(&w.tensor(), dtype);
                t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
            };
            assert!(values(DType::F32) == ours, "{case}: burn ops, f32");
            assert!(values(DType::BF16) == want, "{case}: burn ops, bf16");
        }
    }

    #[test]
    fn thresholds_are_the_midpoints_of_the_levels() {
        for (i, t) in THRESHOLDS.iter().enumerate() {
            let mid = (CODEBOOK[i] as f64 + CODEBOOK[i + 1] as f64) / 2.0;
            assert!((*t as f64 - mid).abs() < 1e-7, "threshold {i}: {t} vs {mid}");
        }
    }

    #[test]
    fn each_level_quantizes_to_itself_and_packs_high_nibble_first() {
        // One block: the 16 levels scaled by 2, then zeros; absmax 2.
        let mut values: Vec<f32> = CODEBOOK.iter().map(|l| l * 2.0).collect();
        values.resize(BLOCK, 0.0);
        let q = quantize(&values);
        assert_eq!(q.absmax, vec![2.0]);
        assert_eq!(&q.packed[..8], &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert!(q.packed[8..].iter().all(|&b| b == 0x77), "zeros are code 7");
        assert_eq!(dequantize(&q, BLOCK), values);
    }

    #[test]
    fn a_zero_block_dequantizes_to_zeros() {
        let q = quantize(&[0.0; BLOCK]);
        assert_eq!(q.absmax, vec![0.0]);
        assert!(q.packed.iter().all(|&b| b == 0x77), "code 7, the level 0.0");
        assert!(dequantize(&q, BLOCK).iter().all(|v| *v == 0.0));
    }

    #[test]
    fn device_dequantization_matches_the_host_for_a_partial_last_block() {
        // 3 x 50 = 150 values: two whole blocks and 22 of a third.
        let values: Vec<f32> = (0..150).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let device = Default::default();
        let w = Nf4::<Flex>::quantize(&values, [3, 50], &device);
        let got = dequantize_default(&w.tensor(), DType::F32);
        assert_eq!(got.dims(), [3, 50]);
        let want = dequantize(&quantize(&values), 150);
        assert_eq!(got.into_data().into_vec::<f32>().unwrap(), want);
    }
}
