//! Flash attention on CUDA tensor cores (`flash_attention.cu`): bf16 Q, K, V with head dim 64
//! or 128, the mask given as each query's run of visible keys ([`crate::KeyRanges`]), grouped
//! K/V heads read in place. Forward and backward never hold a [T, S] score matrix: the
//! forward keeps O and the log-sum-exp per query, the backward recomputes P tile by tile.
//!
//! Why: the blockwise attention ([`super::attention`]) wrote the f32 scores, P, dP and dS of a
//! whole block to memory and read them back: at 0.5B, 4 x 2048 that was most of the step's
//! GPU time after the GEMMs moved to cuBLAS. Here they stay in registers, and key tiles no
//! query of a tile can see (the upper triangle, other documents) are skipped.
//!
//! One query a row (a decoding step) takes [`Decode`]'s kernels instead: the keys split
//! across CTAs, each reading a K/V head once for its whole group of query heads.
//!
//! Inputs the kernels do not take (another dtype or head dim, strides that are not multiples
//! of 8 elements, a GPU before sm_80) get `Err`; the caller then uses the blockwise path.
//! `DISTILL_ATTENTION=blockwise` does so always.

use super::contiguous;
use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use super::nvrtc::{self, Arg, Call, Launch};
use super::stream;

type CudaTensor = CubeTensor<CudaRuntime>;

const SOURCE: &str = include_str!("flash_attention.cu");
/// Rows of a tile (queries or keys), as `TILE` in the source.
const TILE: usize = 64;
const THREADS: u32 = 128;
/// Shared-memory tiles of the forward (its 128-query Q tile, two K and two V tiles), the dQ
/// kernel (two K and two V tiles; Q and dO pass through them into registers) and the dK/dV
/// kernel (its K and V tiles, two Q and two dO tiles).
const FWD_TILES: usize = 6;
const QUERY_TILES: usize = 4;
const DKDV_TILES: usize = 6;
/// Queries of a forward CTA, as `QT` in the source.
const FWD_ROWS: usize = 2 * TILE;

/// The kernels for one head dim: sm_80 tensor-core instructions.
pub(super) fn module(hd: usize) -> nvrtc::Module {
    nvrtc::Module {
        key: format!("flash_attention hd{hd}"),
        sources: &[SOURCE],
        arch: Some("compute_80"),
        options: vec![format!("-DHD={hd}")],
        names: &[
            "flash_fwd",
            "flash_bwd_dq",
            "flash_bwd_dkdv",
            "flash_delta",
            "flash_sum_groups",
            "flash_decode",
            "flash_decode_combine",
        ],
        dynamic_smem: smem(hd, FWD_TILES.max(DKDV_TILES)),
    }
}

/// The softmax scale 1/√hd every attention path here passes its kernels: the fused decoding
/// step must pass the very same f32 as the op-by-op path to give the same logits.
pub(super) fn softmax_scale(hd: usize) -> f32 {
    1.0 / (hd as f32).sqrt()
}

/// Shared memory for `tiles` bf16 tiles of [TILE, hd + 8].
fn smem(hd: usize, tiles: usize) -> u32 {
    (tiles * TILE * (hd + 8) * 2) as u32
}

/// A bf16 [B, heads, rows, hd] operand as the kernels read it: contiguous head dim, the other
/// strides multiples of 8 elements, a 16-byte aligned start.
pub(super) struct Operand {
    pub(super) tensor: CudaTensor,
    /// Strides of batch, head and row, in elements.
    pub(super) strides: [i64; 3],
}

impl Operand {
    fn new(t: &CudaTensor, what: &str, hd: usize) -> Result<Self, String> {
        if t.dtype != DType::BF16 || t.meta.rank() != 4 || t.meta.shape()[3] != hd {
            return Err(format!(
                "the kernels take bf16 with head dim 64 or 128; {what} is {:?} {:?}",
                t.dtype,
                t.meta.shape().as_slice()
            ));
        }
        let fits = |t: &CudaTensor| {
            let st = t.meta.strides();
            st[3] == 1
                && st[..3].iter().all(|s| s % 8 == 0)
                && t.handle.offset_start.unwrap_or(0).is_multiple_of(16)
        };
        let tensor = if fits(t) {
            t.clone()
        } else {
            let c = contiguous(t.clone());
            if !fits(&c) {
                return Err(format!(
                    "{what}: strides {:?} are not multiples of 8",
                    c.meta.strides()
                ));
            }
            c
        };
        let st = tensor.meta.strides();
        let strides = [st[0] as i64, st[1] as i64, st[2] as i64];
        Ok(Operand { tensor, strides })
    }

    pub(super) fn dims(&self) -> [usize; 4] {
        let s = self.tensor.meta.shape();
        [s[0], s[1], s[2], s[3]]
    }

    pub(super) fn binding(&self) -> burn_cubecl::cubecl::server::Binding {
        self.tensor.handle.clone().binding()
    }
}

/// A new contiguous tensor of `dims` on `like`'s device, unwritten.
pub(super) fn empty(like: &CudaTensor, dims: Vec<usize>, dtype: DType) -> CudaTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), dims.into(), dtype)
}

/// A bf16 output [B, rows, heads, hd] (contiguous), written by the kernels as the view
/// [B, heads, rows, hd]: the layout the model's next reshape wants.
pub(super) fn output(like: &CudaTensor, [b, h, r, d]: [usize; 4]) -> Operand {
    let t = empty(like, vec![b, r, h, d], DType::BF16);
    let st = [(r * h * d) as i64, d as i64, (h * d) as i64];
    Operand {
        tensor: t,
        strides: st,
    }
}

/// Which keys each query sees: [R, T] i32 `lo` and `hi`, R = 1 or B; None = all keys.
pub type Ranges<'a> = Option<(&'a CudaTensor, &'a CudaTensor)>;

/// The ranges' tensors, checked, and whether there is one row of them per batch row.
pub(super) fn ranges(
    r: Ranges,
    b: usize,
    t: usize,
) -> Result<(Option<(CudaTensor, CudaTensor)>, bool), String> {
    let Some((lo, hi)) = r else {
        return Ok((None, false));
    };
    let check = |x: &CudaTensor| -> Result<CudaTensor, String> {
        let s = x.meta.shape();
        if x.dtype != DType::I32 || x.meta.rank() != 2 || s[1] != t || (s[0] != 1 && s[0] != b) {
            return Err(format!(
                "key ranges are {:?} {:?}, not i32 [1 or {b}, {t}]",
                x.dtype,
                x.meta.shape().as_slice()
            ));
        }
        Ok(contiguous(x.clone()))
    };
    let per_row = lo.meta.shape()[0] == b && b > 1;
    Ok((Some((check(lo)?, check(hi)?)), per_row))
}

/// The shapes of one call: q [B, H, T, hd], k/v [B, KV, S, hd].
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) b: usize,
    pub(super) heads: usize,
    pub(super) groups: usize,
    pub(super) t: usize,
    pub(super) s: usize,
    pub(super) hd: usize,
}

impl Shape {
    pub(super) fn new(q: &CudaTensor, k: &CudaTensor, v: &CudaTensor) -> Result<Self, String> {
        let (qs, ks, vs) = (q.meta.shape(), k.meta.shape(), v.meta.shape());
        if q.meta.rank() != 4 || k.meta.rank() != 4 || ks.as_slice() != vs.as_slice() {
            return Err(format!(
                "shapes q {:?} k {:?} v {:?}",
                qs.as_slice(),
                ks.as_slice(),
                vs.as_slice()
            ));
        }
        let (b, heads, t, hd) = (qs[0], qs[1], qs[2], qs[3]);
        let (kv, s) = (ks[1], ks[2]);
        if ks[0] != b || ks[3] != hd || kv == 0 || heads % kv != 0 || !matches!(hd, 64 | 128) {
            return Err(format!(
                "the kernels take head dim 64 or 128 and whole K/V head groups; q {:?} k {:?}",
                qs.as_slice(),
                ks.as_slice()
            ));
        }
        if b == 0 || t == 0 || s == 0 || t > i32::MAX as usize || s > i32::MAX as usize {
            return Err("empty or oversized".into());
        }
        Ok(Shape {
            b,
            heads,
            groups: heads / kv,
            t,
            s,
            hd,
        })
    }

    /// What every kernel takes last: ranges, per-row flag, heads, groups, T, S, scale.
    fn tail(&self, lo: u64, hi: u64, per_row: bool, scale: f32) -> [Arg; 8] {
        use Arg::*;
        [
            Ptr(lo),
            Ptr(hi),
            I32(per_row as i32),
            I32(self.heads as i32),
            I32(self.groups as i32),
            I32(self.t as i32),
            I32(self.s as i32),
            F32(scale),
        ]
    }

    /// A CTA per tile of `rows` (T or S) per head (of `heads`) per batch row, with `tiles`
    /// shared-memory tiles.
    fn launch(&self, rows: usize, heads: usize, tiles: usize) -> Launch {
        Launch {
            grid: (rows.div_ceil(TILE) as u32, heads as u32, self.b as u32),
            threads: THREADS,
            dynamic_smem: smem(self.hd, tiles),
        }
    }
}

/// q [B, H, T, hd], k and v [B, KV, S, hd] as the kernels read them, with their shapes.
pub(super) fn operands(
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
) -> Result<(Shape, [Operand; 3]), String> {
    let sh = Shape::new(q, k, v)?;
    let read = [
        Operand::new(q, "q", sh.hd)?,
        Operand::new(k, "k", sh.hd)?,
        Operand::new(v, "v", sh.hd)?,
    ];
    Ok((sh, read))
}

/// A backward's other inputs, checked against q: the forward's output and log-sum-exp
/// [B, H, T, 1] f32 (made contiguous) and the output's gradient.
pub(super) fn backward_operands(
    sh: &Shape,
    q: &Operand,
    out: &CudaTensor,
    lse: &CudaTensor,
    d_out: &CudaTensor,
) -> Result<(Operand, Operand, CudaTensor), String> {
    let (out, d_out) = (
        Operand::new(out, "out", sh.hd)?,
        Operand::new(d_out, "d_out", sh.hd)?,
    );
    if d_out.dims() != q.dims() || out.dims() != q.dims() {
        return Err(format!("out {:?}, d_out {:?}", out.dims(), d_out.dims()));
    }
    if lse.dtype != DType::F32 || lse.meta.shape().as_slice() != [sh.b, sh.heads, sh.t, 1] {
        return Err(format!("lse: {:?} {:?}", lse.dtype, lse.meta.shape()));
    }
    Ok((out, d_out, contiguous(lse.clone())))
}

/// softmax(scale q kᵀ, ranges) v and the log-sum-exp per query. q: [B, H, T, hd], k/v:
/// [B, KV, S, hd]. Returns the output as [B, T, H, hd] (contiguous) and lse [B, H, T, 1] f32.
pub fn forward(
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    keys: Ranges,
    scale: f32,
) -> Result<(CudaTensor, CudaTensor), String> {
    let (sh, [q, k, v]) = operands(q, k, v)?;
    nvrtc::ensure_loaded(&q.tensor.device, module(sh.hd))?;
    let (keys, per_row) = ranges(keys, sh.b, sh.t)?;
    let o = output(&q.tensor, q.dims());
    let lse = empty(&q.tensor, vec![sh.b, sh.heads, sh.t, 1], DType::F32);
    let (lo, hi) = range_bindings(&keys, &q);
    let bindings = [
        q.binding(),
        k.binding(),
        v.binding(),
        o.binding(),
        lse.handle.clone().binding(),
        lo,
        hi,
    ];
    let device = q.tensor.device.clone();
    let fwd = Forward {
        shape: sh,
        strides: [q.strides, k.strides, v.strides, o.strides],
        has_keys: keys.is_some(),
        per_row,
        scale,
    };
    let m = module(fwd.shape.hd);
    match fwd.decode() {
        Some(dec) => {
            let [part, ml] = dec
                .scratch()
                .map(|n| empty(&q.tensor, vec![n], DType::F32).handle.binding());
            let [bq, bk, bv, bo, bl, blo, bhi] = bindings;
            let bindings = [bq, bk, bv, bo, bl, blo, bhi, part, ml];
            stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
                (dec.calls(ptrs, None).iter()).try_for_each(|c| c.launch(device.index, &m, stream))
            })?;
        }
        None => stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
            fwd.call(ptrs).launch(device.index, &m, stream)
        })?,
    }
    Ok((o.tensor, lse))
}

/// One `flash_fwd` launch besides its buffers: shapes, the strides of q, k, v and o, whether
/// key ranges are given (and one row of them per batch row), the softmax scale.
#[derive(Clone, Copy)]
pub(super) struct Forward {
    pub shape: Shape,
    pub strides: [[i64; 3]; 4],
    pub has_keys: bool,
    pub per_row: bool,
    pub scale: f32,
}

impl Forward {
    /// The kernel over `[q, k, v, o, lse, lo, hi]` (lo and hi not read without ranges).
    pub(super) fn call(&self, [pq, pk, pv, po, pl, plo, phi]: [u64; 7]) -> Call {
        let sh = &self.shape;
        let [qs, ks, vs, os] = self.strides;
        let mut args = Vec::with_capacity(26);
        args.extend(strided(pq, qs));
        args.extend(strided(pk, ks));
        args.extend(strided(pv, vs));
        args.extend(strided(po, os));
        args.push(Arg::Ptr(pl));
        let (lo, hi) = if self.has_keys { (plo, phi) } else { (0, 0) };
        args.extend(sh.tail(lo, hi, self.per_row, self.scale));
        Call {
            name: "flash_fwd",
            how: Launch {
                grid: (sh.t.div_ceil(FWD_ROWS) as u32, sh.heads as u32, sh.b as u32),
                ..sh.launch(sh.t, sh.heads, FWD_TILES)
            },
            args,
        }
    }
}

/// Most query heads per K/V head and most keys per CTA of the decoding kernels, as
/// `DEC_GMAX` and `DEC_SPLIT` in the source.
const DECODE_GROUPS: usize = 16;
const DECODE_SPLIT: usize = 512;
/// CTAs a decoding call aims at: two per SM of an H100. Fewer splits leave SMs idle at small
/// batches; more only add work to the combine.
const DECODE_CTAS: usize = 264;
const DECODE_THREADS: u32 = 128;

/// A paged KV cache's page table as the decoding kernels read it (`flash_decode`,
/// `rope_qkv`): the caches are pools of slots [slots, KV, hd]; row b's position p sits in
/// slot `table[b][(p + shift[b]) / page_len] * page_len + (p + shift[b]) % page_len`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Paging {
    /// i32 [B, ld] page ids, and i32 [B] shifts.
    pub table: u64,
    pub ld: usize,
    pub shift: u64,
    pub page_len: usize,
}

impl Paging {
    /// The kernels' last four arguments: null pointers without a table.
    pub(super) fn args(pages: Option<Paging>) -> [Arg; 4] {
        match pages {
            Some(p) => [
                Arg::Ptr(p.table),
                Arg::I32(p.ld as i32),
                Arg::Ptr(p.shift),
                Arg::I32(p.page_len as i32),
            ],
            None => [Arg::Ptr(0), Arg::I32(0), Arg::Ptr(0), Arg::I32(1)],
        }
    }
}

/// A [`Forward`] of one query per row (decoding) as `flash_decode` over splits of the keys
/// and `flash_decode_combine`: the forward gives each query a 128-row tile and walks its keys
/// in one CTA, which at T = 1 leaves most of the GPU idle and reads each K/V head once per
/// query head.
pub(super) struct Decode {
    forward: Forward,
    /// Keys per split (a multiple of 64, at most `DECODE_SPLIT`) and splits.
    split_len: usize,
    splits: usize,
}

impl Forward {
    /// This launch as the decoding kernels, where they take it: one query per row, at most
    /// `DECODE_GROUPS` query heads per K/V head.
    pub(super) fn decode(&self) -> Option<Decode> {
        let sh = &self.shape;
        if sh.t != 1 || sh.groups > DECODE_GROUPS {
            return None;
        }
        let ctas_per_split = sh.b * (sh.heads / sh.groups);
        let want = DECODE_CTAS.div_ceil(ctas_per_split);
        let split_len =
            sh.s.div_ceil(want)
                .next_multiple_of(TILE)
                .clamp(TILE, DECODE_SPLIT);
        Some(Decode {
            forward: *self,
            split_len,
            splits: sh.s.div_ceil(split_len),
        })
    }
}

impl Decode {
    /// f32 elements of the two scratch buffers: each split's output [B, H, splits, hd] and
    /// its max and sum [B, H, splits, 2].
    pub(super) fn scratch(&self) -> [usize; 2] {
        let sh = &self.forward.shape;
        let n = sh.b * sh.heads * self.splits;
        [n * sh.hd, n * 2]
    }

    /// [`Decode::scratch`]'s sizes for any number of keys up to `cap` at this batch and
    /// these heads: splits are at most the CTAs' aim, or `cap` over the longest split.
    pub(super) fn scratch_up_to(&self, cap: usize) -> [usize; 2] {
        let sh = &self.forward.shape;
        let most = DECODE_CTAS
            .div_ceil(sh.b * (sh.heads / sh.groups))
            .max(cap.div_ceil(DECODE_SPLIT));
        let n = sh.b * sh.heads * most;
        [n * sh.hd, n * 2]
    }

    /// The two kernels over `[q, k, v, o, lse, lo, hi, part, ml]`, part and ml as
    /// [`Decode::scratch`] sizes them; k and v through `pages` where given (the key strides
    /// are then the pools' head and slot strides).
    pub(super) fn calls(
        &self,
        [pq, pk, pv, po, pl, plo, phi, ppart, pml]: [u64; 9],
        pages: Option<Paging>,
    ) -> [Call; 2] {
        let f = &self.forward;
        let sh = &f.shape;
        let [qs, ks, vs, os] = f.strides;
        let (lo, hi) = if f.has_keys { (plo, phi) } else { (0, 0) };
        let mut split = vec![Arg::Ptr(pq), Arg::I64(qs[0]), Arg::I64(qs[1])];
        split.extend(strided(pk, ks));
        split.extend(strided(pv, vs));
        split.extend([
            Arg::Ptr(ppart),
            Arg::Ptr(pml),
            Arg::Ptr(lo),
            Arg::Ptr(hi),
            Arg::I32(f.per_row as i32),
            Arg::I32(sh.heads as i32),
            Arg::I32(sh.groups as i32),
            Arg::I32(sh.s as i32),
            Arg::I32(self.split_len as i32),
            Arg::F32(f.scale),
        ]);
        split.extend(Paging::args(pages));
        let combine = vec![
            Arg::Ptr(ppart),
            Arg::Ptr(pml),
            Arg::Ptr(po),
            Arg::I64(os[0]),
            Arg::I64(os[1]),
            Arg::Ptr(pl),
            Arg::I32(sh.heads as i32),
            Arg::I32(self.splits as i32),
        ];
        let launch = |grid| Launch {
            grid,
            threads: DECODE_THREADS,
            dynamic_smem: 0,
        };
        let kv = sh.heads / sh.groups;
        [
            Call {
                name: "flash_decode",
                how: launch((self.splits as u32, kv as u32, sh.b as u32)),
                args: split,
            },
            Call {
                name: "flash_decode_combine",
                how: launch((sh.heads as u32, sh.b as u32, 1)),
                args: combine,
            },
        ]
    }
}

/// [`forward`] of one query a row over a paged cache ([`Paging`]): q [B, H, 1, hd]; `pools`
/// k and v [slots, KV, hd] read through `table` i32 [B * ld] (`ld` pages a row, of
/// `page_len` slots) and `shift` i32 [B] for positions 0..s of each row. Returns the output
/// as [B, 1, H, hd] (contiguous).
pub fn forward_paged(
    q: &CudaTensor,
    [k, v]: [&CudaTensor; 2],
    [table, shift]: [&CudaTensor; 2],
    [ld, page_len]: [usize; 2],
    s: usize,
    keys: Ranges,
) -> Result<CudaTensor, String> {
    let q = Operand::new(q, "q", q.meta.shape().as_slice().last().copied().unwrap_or(0))?;
    let [b, heads, t, hd] = q.dims();
    let kv_heads = match k.meta.shape().as_slice() {
        &[_, h, d] if d == hd && h > 0 && heads % h == 0 => h,
        other => return Err(format!("k pool {other:?} for {heads} heads of {hd}")),
    };
    for (x, what) in [(k, "k pool"), (v, "v pool")] {
        if x.dtype != q.tensor.dtype
            || x.dtype != DType::BF16
            || x.meta.shape() != k.meta.shape()
            || !x.is_contiguous()
        {
            return Err(format!("{what}: {:?} {:?}", x.dtype, x.meta.shape()));
        }
    }
    if table.dtype != DType::I32 || table.meta.shape().as_slice() != [b * ld] || !table.is_contiguous() {
        return Err(format!(
            "page table: {:?} {:?}, not i32 [{b} x {ld}]",
            table.dtype,
            table.meta.shape()
        ));
    }
    if shift.dtype != DType::I32 || shift.meta.shape().as_slice() != [b] || !shift.is_contiguous() {
        return Err(format!("page shifts: {:?} {:?}", shift.dtype, shift.meta.shape()));
    }
    if t != 1 || page_len == 0 || s == 0 || (s - 1) / page_len >= ld {
        return Err(format!("{t} queries over {s} keys in {ld} pages of {page_len}"));
    }
    let sh = Shape {
        b,
        heads,
        groups: heads / kv_heads,
        t,
        s,
        hd,
    };
    let (keys, per_row) = ranges(keys, b, t)?;
    let kv = [0, hd as i64, (kv_heads * hd) as i64];
    let o = output(&q.tensor, [b, heads, t, hd]);
    let lse = empty(&q.tensor, vec![b, heads, t, 1], DType::F32);
    let fwd = Forward {
        shape: sh,
        strides: [q.strides, kv, kv, o.strides],
        has_keys: keys.is_some(),
        per_row,
        scale: softmax_scale(hd),
    };
    let Some(dec) = fwd.decode() else {
        return Err(format!("{heads} query heads a K/V head of {kv_heads}"));
    };
    let device = q.tensor.device.clone();
    nvrtc::ensure_loaded(&device, module(hd))?;
    let [part, ml] = dec.scratch().map(|n| empty(&q.tensor, vec![n], DType::F32));
    let (lo, hi) = range_bindings(&keys, &q);
    let bindings = [&q.tensor, k, v, &o.tensor, &lse]
        .map(|t| t.handle.clone().binding())
        .into_iter()
        .chain([lo, hi])
        .chain([&part, &ml, table, shift].map(|t| t.handle.clone().binding()))
        .collect();
    let m = module(hd);
    stream::run_on_stream_all(&device, bindings, nvrtc::ordering(), move |stream, p| {
        let pages = Paging {
            table: p[9],
            ld,
            shift: p[10],
            page_len,
        };
        let ptrs = [p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]];
        (dec.calls(ptrs, Some(pages)).iter()).try_for_each(|c| c.launch(device.index, &m, stream))
    })?;
    Ok(o.tensor)
}

/// Gradients of [`forward`] for q, k and v given its output `out` [B, H, T, hd], the
/// log-sum-exp it returned and the output gradient `d_out` [B, H, T, hd]. Returns dq as
/// [B, T, H, hd] and dk, dv as [B, KV, S, hd], bf16 and contiguous.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    keys: Ranges,
    out: &CudaTensor,
    lse: &CudaTensor,
    d_out: &CudaTensor,
    scale: f32,
) -> Result<(CudaTensor, CudaTensor, CudaTensor), String> {
    let (sh, [q, k, v]) = operands(q, k, v)?;
    nvrtc::ensure_loaded(&q.tensor.device, module(sh.hd))?;
    let (out, d_out, lse) = backward_operands(&sh, &q, out, lse, d_out)?;
    let (keys, per_row) = ranges(keys, sh.b, sh.t)?;
    let delta = empty(&q.tensor, vec![sh.b, sh.heads, sh.t], DType::F32);
    let dq = output(&q.tensor, q.dims());
    // dK and dV per query head in f32, [B, H, S, hd], then summed over each group in bf16.
    let kv = sh.heads / sh.groups;
    let partial_strides = [
        (sh.heads * sh.s * sh.hd) as i64,
        (sh.s * sh.hd) as i64,
        sh.hd as i64,
    ];
    let (dk_part, dv_part) = (
        empty(&q.tensor, vec![sh.b, sh.heads, sh.s, sh.hd], DType::F32),
        empty(&q.tensor, vec![sh.b, sh.heads, sh.s, sh.hd], DType::F32),
    );
    let (dk, dv) = (
        empty(&q.tensor, vec![sh.b, kv, sh.s, sh.hd], DType::BF16),
        empty(&q.tensor, vec![sh.b, kv, sh.s, sh.hd], DType::BF16),
    );
    let (lo, hi) = range_bindings(&keys, &q);
    let bindings = [
        q.binding(),
        k.binding(),
        v.binding(),
        d_out.binding(),
        out.binding(),
        lse.handle.clone().binding(),
        delta.handle.clone().binding(),
        dq.binding(),
        dk_part.handle.clone().binding(),
        dv_part.handle.clone().binding(),
        dk.handle.clone().binding(),
        dv.handle.clone().binding(),
        lo,
        hi,
    ];
    let device = q.tensor.device.clone();
    let (dq_launch, dkdv_launch) = (
        sh.launch(sh.t, sh.heads, QUERY_TILES),
        sh.launch(sh.s, sh.heads, DKDV_TILES),
    );
    let delta_launch = Launch {
        grid: (sh.t.div_ceil(4) as u32, sh.heads as u32, sh.b as u32),
        threads: THREADS,
        dynamic_smem: 0,
    };
    // Four elements a thread (hd is 64 or 128).
    let quads = sh.b * kv * sh.s * sh.hd / 4;
    let sum_launch = Launch::grid_stride(quads);
    let has_keys = keys.is_some();
    let strides = [
        q.strides,
        k.strides,
        v.strides,
        d_out.strides,
        out.strides,
        dq.strides,
    ];
    stream::run_on_stream(
        &device,
        bindings,
        nvrtc::ordering(),
        move |stream, [pq, pk, pv, pdo, po, pl, pd, pdq, pdk, pdv, pdk16, pdv16, plo, phi]| {
            let [qs, ks, vs, dos, os, dqs] = strides;
            let (lo, hi) = if has_keys { (plo, phi) } else { (0, 0) };
            let m = module(sh.hd);
            let run = |name: &str, how: Launch, args: &[Arg]| {
                nvrtc::launch(device.index, &m, name, how, stream, args)
            };
            let mut args = Vec::with_capacity(32);
            args.extend(strided(po, os));
            args.extend(strided(pdo, dos));
            args.extend([Arg::Ptr(pd), Arg::I32(sh.heads as i32), Arg::I32(sh.t as i32)]);
            run("flash_delta", delta_launch, &args)?;
            args.clear();
            for (p, st) in [(pq, qs), (pk, ks), (pv, vs), (pdo, dos)] {
                args.extend(strided(p, st));
            }
            args.extend([Arg::Ptr(pl), Arg::Ptr(pd)]);
            let common = args.len();
            args.extend(strided(pdq, dqs));
            args.extend(sh.tail(lo, hi, per_row, scale));
            run("flash_bwd_dq", dq_launch, &args)?;
            args.truncate(common);
            args.extend(strided(pdk, partial_strides));
            args.extend(strided(pdv, partial_strides));
            args.extend(sh.tail(lo, hi, per_row, scale));
            run("flash_bwd_dkdv", dkdv_launch, &args)?;
            for (part, out) in [(pdk, pdk16), (pdv, pdv16)] {
                let args = [
                    Arg::Ptr(part),
                    Arg::Ptr(out),
                    Arg::I64(quads as i64),
                    Arg::I32(sh.groups as i32),
                    Arg::I64((sh.s * sh.hd / 4) as i64),
                ];
                run("flash_sum_groups", sum_launch, &args)?;
            }
            Ok(())
        },
    )?;
    Ok((dq.tensor, dk, dv))
}

fn strided(ptr: u64, [b, h, r]: [i64; 3]) -> [Arg; 4] {
    [Arg::Ptr(ptr), Arg::I64(b), Arg::I64(h), Arg::I64(r)]
}

/// Bindings for lo and hi, or (without ranges) q's, unused: the kernels get null pointers.
fn range_bindings(
    keys: &Option<(CudaTensor, CudaTensor)>,
    q: &Operand,
) -> (
    burn_cubecl::cubecl::server::Binding,
    burn_cubecl::cubecl::server::Binding,
) {
    match keys {
        Some((lo, hi)) => (lo.handle.clone().binding(), hi.handle.clone().binding()),
        None => (q.binding(), q.binding()),
    }
}
