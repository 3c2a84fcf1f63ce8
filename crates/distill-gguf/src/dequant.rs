//! ggml blocks to f32, bit for bit as gguf-py's `gguf.quants` numpy code computes them: the f16
//! scales widen to f32 first and every product and sum is one f32 operation in the same order
//! (Rust never fuses a*b+c into an FMA on its own, and neither does numpy).
//!
//! Block layouts are ggml-common.h's; each function below names the struct it reads.

use half::{bf16, f16};

use crate::ggml::{GgmlType, QK_K};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out`, whose length is the element count.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let n = out.len() as u64;
    if ty.bytes_for(n) != Some(bytes.len() as u64) {
        return Err(format!(
            "{} bytes do not hold {n} {} elements",
            bytes.len(),
            ty.name()
        ));
    }
    let blocks = bytes.chunks_exact(ty.type_size());
    let outs = out.chunks_exact_mut(ty.block_size());
    let each: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        other => {
            return Err(format!(
                "ggml type {} cannot be dequantized here (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                other.name()
            ));
        }
    };
    for (b, y) in blocks.zip(outs) {
        each(b, y);
    }
    Ok(())
}

/// The 4-bit value `j` of a 32-element block: low nibbles first, then high nibbles.
fn nibble(qs: &[u8], j: usize) -> u8 {
    let half = qs.len();
    if j < half { qs[j] & 0x0F } else { qs[j - half] >> 4 }
}

/// block_q4_0: f16 d, 16 bytes of nibbles; x = d * (q - 8).
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, out) in y.iter_mut().enumerate() {
        *out = d * f32::from(nibble(qs, j) as i8 - 8);
    }
}

/// block_q4_1: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for (j, out) in y.iter_mut().enumerate() {
        *out = d * f32::from(nibble(qs, j)) + m;
    }
}

/// Fifth bit of element j from the 32-bit `qh` field.
fn high_bit(qh: &[u8], j: usize) -> u8 {
    let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    ((bits >> j) & 1) as u8
}

/// block_q5_0: f16 d, u32 qh, 16 bytes of nibbles; x = d * (q - 16).
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let (qh, qs) = (&b[2..6], &b[6..22]);
    for (j, out) in y.iter_mut().enumerate() {
        let q = nibble(qs, j) | (high_bit(qh, j) << 4);
        *out = d * f32::from(q as i8 - 16);
    }
}

/// block_q5_1: f16 d, f16 m, u32 qh, 16 bytes of nibbles; x = d * q + m.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let (qh, qs) = (&b[4..8], &b[8..24]);
    for (j, out) in y.iter_mut().enumerate() {
        let q = nibble(qs, j) | (high_bit(qh, j) << 4);
        *out = d * f32::from(q) + m;
    }
}

/// block_q8_0: f16 d, 32 signed bytes; x = q * d.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (out, &q) in y.iter_mut().zip(&b[2..34]) {
        *out = f32::from(q as i8) * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from Q4_K/Q5_K's 12 packed bytes
/// (gguf-py `Q4_K.get_scale_min`, ggml `get_scale_min_k4`).
pub(crate) fn scale_min_k4(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// The per-sub-block factors of Q4_K/Q5_K: (d * scale, dmin * min), each one f32 product.
fn k4_factors(b: &[u8]) -> [(f32, f32); 8] {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    std::array::from_fn(|j| {
        let (sc, m) = scale_min_k4(scales, j);
        (d * f32::from(sc), dmin * f32::from(m))
    })
}

/// block_q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
/// Sub-block 2i takes the low nibbles of qs[32i..32i+32], sub-block 2i+1 the high ones.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let factors = k4_factors(b);
    let qs = &b[16..144];
    for (j, out) in y.iter_mut().enumerate() {
        let (sub, l) = (j / 32, j % 32);
        let byte = qs[32 * (sub / 2) + l];
        let q = if sub % 2 == 0 { byte & 0x0F } else { byte >> 4 };
        let (d, dm) = factors[sub];
        *out = d * f32::from(q) - dm;
    }
}

/// block_q5_K: as Q4_K plus 32 bytes of fifth bits (bit `sub` of qh[l]) before the nibbles.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let factors = k4_factors(b);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (j, out) in y.iter_mut().enumerate() {
        let (sub, l) = (j / 32, j % 32);
        let byte = qs[32 * (sub / 2) + l];
        let low = if sub % 2 == 0 { byte & 0x0F } else { byte >> 4 };
        let q = low | (((qh[l] >> sub) & 1) << 4);
        let (d, dm) = factors[sub];
        *out = d * f32::from(q) - dm;
    }
}

/// block_q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed scales, f16 d.
/// In each 128-element half h, element 64s+k (s = 0, 1) takes nibble s of ql[64h + k] and
/// element 32s+k (s = 0..4) takes bits 2s..2s+2 of qh[32h + k]; x = (d * scale) * (q - 32).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (j, out) in y.iter_mut().enumerate() {
        let (h, e) = (j / 128, j % 128);
        let low = (ql[64 * h + e % 64] >> (4 * (e / 64))) & 0x0F;
        let high = (qh[32 * h + e % 32] >> (2 * (e / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        let scale = d * f32::from(scales[j / 16] as i8);
        *out = scale * f32::from(q);
    }
    debug_assert_eq!(y.len(), QK_K);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{f32s, raw_tensors};

    /// Every type against gguf-py's numpy dequantization, compared as bit patterns.
    #[test]
    fn equals_gguf_py_bit_for_bit() {
        let fx = raw_tensors("quants.safetensors");
        let types = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ];
        for ty in types {
            let blocks = &fx[&format!("{}.blocks", ty.name())];
            let want = f32s(&fx[&format!("{}.values", ty.name())]);
            assert!(want.len() >= 64, "{}: fixture too small", ty.name());
            let mut got = vec![0.0; want.len()];
            dequantize(ty, blocks, &mut got).unwrap();
            let mismatches = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                mismatches,
                0,
                "{}: {mismatches} of {} values differ",
                ty.name(),
                want.len()
            );
        }
    }

    #[test]
    fn wrong_sizes_and_unsupported_types_are_errors() {
        let mut out = vec![0.0; 32];
        let err = dequantize(GgmlType::Q8_0, &[0; 33], &mut out).unwrap_err();
        assert!(err.contains("33 bytes do not hold 32 Q8_0"), "{err}");
        let err = dequantize(GgmlType::IQ4_NL, &[0; 18], &mut out).unwrap_err();
        assert!(err.contains("IQ4_NL cannot be dequantized"), "{err}");
    }
}
