//! f32 to ggml blocks, for export. Q8_0, Q4_0 and Q5_0 follow gguf-py's `gguf.quants` (which is
//! bit-exact with ggml's reference); Q4_K and Q6_K, which gguf-py cannot produce, are ports of
//! ggml-quants.c's `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref` (the path llama-quantize
//! takes without an importance matrix), scale search included, and byte-identical to them.

use half::{bf16, f16};

use crate::ggml::{GgmlType, QK_K};

/// Quantizes `x` (a whole number of blocks) to `ty`.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, String> {
    if ty.bytes_for(x.len() as u64).is_none() {
        return Err(format!(
            "{} elements are not whole {} blocks of {}",
            x.len(),
            ty.name(),
            ty.block_size()
        ));
    }
    let block: fn(&[f32], &mut Vec<u8>) = match ty {
        GgmlType::F32 => |x, out| out.extend_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => |x, out| out.extend_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
        GgmlType::BF16 => |x, out| out.extend_from_slice(&bf16::from_f32(x[0]).to_le_bytes()),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q6_K => q6_k,
        other => return Err(format!("quantizing to {} is not supported", other.name())),
    };
    let mut out = Vec::with_capacity(ty.bytes_for(x.len() as u64).unwrap_or(0) as usize);
    for chunk in x.chunks_exact(ty.block_size()) {
        block(chunk, &mut out);
    }
    Ok(out)
}

/// The element of largest magnitude, the first one on ties (numpy's argmax of abs).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    max
}

fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Q8_0: d = absmax / 127, q = round-half-away(x / d).
fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    push_f16(out, d);
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Q4_0: d = max / -8 (max is the signed element of largest magnitude), q = trunc(x/d + 8.5).
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    push_f16(out, d);
    let q = |v: f32| ((v * id + 8.5).trunc() as i32).clamp(0, 15) as u8;
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
}

/// Q5_0: as Q4_0 with 5 bits, the fifth packed into a little-endian u32.
fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    push_f16(out, d);
    let q: Vec<u8> = x
        .iter()
        .map(|&v| ((v * id + 16.5).trunc() as i32).clamp(0, 31) as u8)
        .collect();
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |bits, (j, &v)| bits | (u32::from(v >> 4) << j));
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0F) | (q[j + 16] << 4)));
}

/// ggml's `nearest_int`: round half to even through the 1.5 * 2^23 trick, exactly as C does.
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// ggml `make_qkx2_quants`: an asymmetric `nmax`-level grid for `x` with weights, trying
/// `nstep + 1` scales around (max - min) / nmax by weighted least squares. Returns (scale, -min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * f32::from(l[i]) + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(laux[i]) + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K: eight 32-element sub-blocks, each with a 6-bit scale and min relative to the block's
/// f16 `d` and `dmin` (`quantize_row_q4_K_ref`).
fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0.0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        let (scale, min) = make_qkx2_quants(15, xs, &weights, &mut l[32 * j..32 * j + 32], -1.0, 0.1, 20);
        scales[j] = scale;
        mins[j] = min;
        max_scale = max_scale.max(scale);
        max_min = max_min.max(min);
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = crate::dequant::scale_min_k4(&packed, j);
        let dj = d.to_f32() * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    for chunk in l.chunks_exact(64) {
        out.extend((0..32).map(|i| chunk[i] | (chunk[i + 32] << 4)));
    }
}

const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml `make_qx_quants` with rmse_type 1 (weights x^2) and no importance matrix: a symmetric
/// grid of 2*nmax levels, trying 18 scales around nmax / max. Writes q + nmax into `l`.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = quant(iscale, v);
        l[i] = (q + nmax) as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let q = quant(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (quant(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K: sixteen 16-element sub-blocks with signed 8-bit scales relative to one f16 `d`
/// (`quantize_row_q6_K_ref`).
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend(std::iter::repeat_n(0u8, GgmlType::Q6_K.type_size()));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let sc: [i8; 16] = std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for j in 0..16 {
        let dj = d.to_f32() * f32::from(sc[j]);
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            let q = nearest_int(x[16 * j + i] / dj).clamp(-32, 31);
            l[16 * j + i] = (q + 32) as i8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (half, chunk) in l.chunks_exact(128).enumerate() {
        let u = |i: usize| chunk[i] as u8;
        for i in 0..32 {
            ql[64 * half + i] = (u(i) & 0x0F) | ((u(i + 64) & 0x0F) << 4);
            ql[64 * half + i + 32] = (u(i + 32) & 0x0F) | ((u(i + 96) & 0x0F) << 4);
            qh[32 * half + i] =
                (u(i) >> 4) | ((u(i + 32) >> 4) << 2) | ((u(i + 64) >> 4) << 4) | ((u(i + 96) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::dequantize;
    use crate::test_util::{f32s, raw_tensors};

    /// F16, BF16, Q8_0, Q4_0 and Q5_0 against gguf-py's quantizers (bit-exact with ggml's).
    #[test]
    fn equals_gguf_py_byte_for_byte() {
        let fx = raw_tensors("quants.safetensors");
        for ty in [
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
        ] {
            let input = f32s(&fx[&format!("{}.input", ty.name())]);
            let want = &fx[&format!("{}.blocks", ty.name())];
            let got = quantize(ty, &input).unwrap();
            let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
            assert_eq!(got.len(), want.len(), "{}", ty.name());
            assert_eq!(differ, 0, "{}: {differ} bytes differ", ty.name());
        }
    }

    /// Q4_K and Q6_K against ggml's own quantize_row_q4_K_ref / quantize_row_q6_K_ref (compiled
    /// by the fixture script from llama-cpp-python 0.3.36's vendored llama.cpp).
    #[test]
    fn k_quants_equal_ggml_reference_byte_for_byte() {
        let fx = raw_tensors("kquants.safetensors");
        let input = f32s(&fx["input"]);
        assert_eq!(input.len(), 16 * QK_K);
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let want = &fx[ty.name()];
            let got = quantize(ty, &input).unwrap();
            assert_eq!(got.len(), want.len(), "{}", ty.name());
            let blocks_differ = got
                .chunks(ty.type_size())
                .zip(want.chunks(ty.type_size()))
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                blocks_differ,
                0,
                "{}: {blocks_differ} of 16 blocks differ",
                ty.name()
            );
        }
    }

    /// Root-mean-square error of a round trip, relative to the data's RMS.
    fn relative_rmse(ty: GgmlType, x: &[f32]) -> f64 {
        let q = quantize(ty, x).unwrap();
        let mut y = vec![0.0; x.len()];
        dequantize(ty, &q, &mut y).unwrap();
        let err: f64 = x.iter().zip(&y).map(|(a, b)| f64::from(a - b).powi(2)).sum();
        let norm: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
        (err / norm).sqrt()
    }

    /// Gaussian weights: each type's error sits where its step size puts it (measured: Q8_0
    /// 0.54%, Q6_K 1.78%, Q5_0 4.27%, Q4_K 7.16%, Q4_0 8.63%; a uniform quantizer's step/sqrt(12)
    /// predicts 0.5%, 1.8%, 4.0%, 7.9%, 7.9%), and more bits are better.
    #[test]
    fn round_trip_errors_are_ordinary_quantization_errors() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut normal = || {
            // Box-Muller on a xorshift stream: no rand dependency for one test.
            let mut uniform = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng >> 11) as f64 / (1u64 << 53) as f64
            };
            let (u, v) = (uniform().max(1e-12), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        };
        let x: Vec<f32> = (0..256 * 64).map(|_| 0.02 * normal()).collect();
        let err = |ty| relative_rmse(ty, &x);
        let (q8, q6k, q5, q4k, q4) = (
            err(GgmlType::Q8_0),
            err(GgmlType::Q6_K),
            err(GgmlType::Q5_0),
            err(GgmlType::Q4_K),
            err(GgmlType::Q4_0),
        );
        eprintln!("relative RMSE: Q8_0 {q8:.4} Q6_K {q6k:.4} Q5_0 {q5:.4} Q4_K {q4k:.4} Q4_0 {q4:.4}");
        assert!(q8 < 0.007, "Q8_0 {q8}");
        assert!(q6k < 0.022, "Q6_K {q6k}");
        assert!(q5 < 0.05, "Q5_0 {q5}");
        assert!(q4k < 0.085, "Q4_K {q4k}");
        assert!(q4 < 0.10, "Q4_0 {q4}");
        assert!(q8 < q6k && q6k < q5 && q5 < q4k && q4k < q4);
        // Zero blocks stay exactly zero (the scale-0 branches).
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0, GgmlType::Q4_0] {
            let q = quantize(ty, &[0.0; 256]).unwrap();
            let mut y = vec![1.0; 256];
            dequantize(ty, &q, &mut y).unwrap();
            assert!(y.iter().all(|v| *v == 0.0), "{}", ty.name());
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even_like_ggml() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, 7.6].map(nearest_int),
            [0, 2, 2, 0, -2, 2, 8]
        );
    }
}
