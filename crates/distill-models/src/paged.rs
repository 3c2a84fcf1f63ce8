//! The KV cache of batched generation, in pages: each layer's keys and values live in pools of
//! slots [slots, KV, hd], `page_len` slots a page, and each row names its pages in order.
//!
//! Why: with one [B, KV, cap, hd] buffer a layer, a row joining the batch, a row leaving it or
//! n samples of one prompt each copied every row's whole cache, and the cache grew by
//! doubling. Here those change tables, not keys: a joining row's prefill is written into
//! pages of its own; a finished row's pages go back to the free list at once; samples of one
//! prompt share its full pages (only the last, partly filled page is copied for each); and
//! memory grows a page at a time.
//!
//! Rows stay left-padded to one length (`len`, shared by every row), as the decoding step
//! wants them, but padding costs no memory: row b's position p is slot `p + shift` of its
//! page list, and pages wholly in its padding name page 0, which holds zeros and is never
//! written. Padding a row by n positions prepends zero pages and moves its shift; trimming
//! common padding drops leading pages.

use burn::tensor::IndexingUpdateOp;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use distill_kernels::{CacheBuffers, KeyRanges, ModelKernels, PageTable, StepState};

use crate::transformer::KvCache;

/// Slots a page: a sample's copy of a prompt's last page is at most this, and a row takes a
/// new page (a new page table on the device) at most once in this many steps.
pub const PAGE_LEN: usize = 64;

/// The zero page: the slots of left padding.
const ZERO: u32 = 0;

#[derive(Debug, Clone, Default)]
struct Row {
    pages: Vec<u32>,
    /// The slot of position 0, counted from the first page's start (< page_len).
    shift: usize,
}

impl Row {
    /// Slot (in the pools) of position `p`.
    fn slot(&self, p: usize, page_len: usize) -> usize {
        let s = p + self.shift;
        self.pages[s / page_len] as usize * page_len + s % page_len
    }

    /// Slots this row's pages hold from position 0 on.
    fn room(&self, page_len: usize) -> usize {
        self.pages.len() * page_len - self.shift
    }
}

/// A batch's paged KV cache (module docs). Rows are in the batch's order.
#[derive(Debug)]
pub struct PagedKv<B: Backend> {
    page_len: usize,
    layers: usize,
    /// Each layer's keys and values [slots, KV, hd]; empty before the first rows come.
    pools: CacheBuffers<B>,
    /// Rows naming each page (the zero page's count is not kept).
    refs: Vec<u32>,
    free: Vec<u32>,
    /// Pages some row names (the zero page not counted).
    used: usize,
    /// Most pages rows may name at once (the zero page not counted); None: no limit.
    limit: Option<usize>,
    rows: Vec<Row>,
    /// Positions cached in every row, its left padding included.
    len: usize,
    /// The page table (flat, [`PageTable`]), its width and the shifts on the device while
    /// the rows' pages are unchanged.
    table: Option<DeviceTable<B>>,
    /// What the backend's fused step keeps for this cache's next step (its graph).
    pub(crate) step: StepState,
}

impl<B: ModelKernels> PagedKv<B> {
    pub fn new(layers: usize) -> Self {
        Self::with_page_len(layers, PAGE_LEN)
    }

    pub fn with_page_len(layers: usize, page_len: usize) -> Self {
        PagedKv {
            page_len: page_len.max(1),
            layers,
            pools: Vec::new(),
            refs: Vec::new(),
            free: Vec::new(),
            used: 0,
            limit: None,
            rows: Vec::new(),
            len: 0,
            table: None,
            step: StepState::default(),
        }
    }

    /// Positions cached in every row (left padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Slots a page.
    pub fn page_len(&self) -> usize {
        self.page_len
    }

    /// Pages some row names (the zero page not counted): the cache's memory in use.
    pub fn pages_in_use(&self) -> usize {
        self.used
    }

    /// Caps the pages rows may name at once (None: no cap). The pools never grow past it;
    /// the caller keeps within it by asking [`PagedKv::admit_cost`] and
    /// [`PagedKv::reserve_cost`] first.
    pub fn set_page_limit(&mut self, pages: Option<usize>) {
        self.limit = pages;
    }

    /// Pages that may still be taken under the cap (None: no cap).
    pub fn pages_free(&self) -> Option<usize> {
        self.limit.map(|l| l.saturating_sub(self.used))
    }

    /// Drops every row; the pools stay for the next ones.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.free = (1..self.refs.len() as u32).rev().collect();
        self.refs.iter_mut().for_each(|n| *n = 0);
        self.used = 0;
        self.len = 0;
        self.table = None;
    }

    /// Pages [`PagedKv::admit`] of these rows would take.
    pub fn admit_cost(&self, width: usize, sources: &[usize], pads: &[usize]) -> usize {
        plan_pages(width, sources, pads, self.page_len)
            .iter()
            .flatten()
            .filter(|p| matches!(p, PagePlan::New))
            .count()
    }

    /// Adds the rows of a prefill whose row d is left-padded by `pads[d]`: row i holds
    /// `prefill`'s row `sources[i]` (a row named twice is a second sample of one prompt: it
    /// shares the first's full pages). Pages wholly in padding are the zero page. The new
    /// rows and the running ones are left-padded to the longer of the two lengths.
    pub fn admit(&mut self, prefill: &KvCache<B>, sources: &[usize], pads: &[usize]) {
        let width = prefill.len();
        if sources.is_empty() || width == 0 {
            return;
        }
        let first = prefill.layer(0).0;
        let [_, kv, _, hd] = first.dims();
        if self.pools.is_empty() {
            // The zero page alone (no empty tensors: CUDA refuses launches over nothing).
            let options = (&first.device(), first.dtype());
            let page = || Tensor::zeros([self.page_len, kv, hd], options);
            self.pools = (0..self.layers).map(|_| (page(), page())).collect();
            self.refs = vec![0];
        }
        if self.rows.is_empty() {
            self.len = 0;
        }
        let pl = self.page_len;
        let mut rows: Vec<Row> = Vec::with_capacity(sources.len());
        // (position in the prefill, as row * width + p; slot it goes to)
        let mut moves: Vec<(usize, usize)> = Vec::new();
        for (plan, &src) in plan_pages(width, sources, pads, pl).into_iter().zip(sources) {
            let mut row = Row::default();
            for (j, how) in plan.into_iter().enumerate() {
                let page = match how {
                    PagePlan::Zero => ZERO,
                    PagePlan::Share(k) => {
                        let page = rows[k].pages[j];
                        self.refs[page as usize] += 1;
                        page
                    }
                    PagePlan::New => {
                        let page = self.alloc();
                        let end = ((j + 1) * pl).min(width);
                        moves.extend(
                            (j * pl..end).map(|p| (src * width + p, page as usize * pl + p - j * pl)),
                        );
                        page
                    }
                };
                row.pages.push(page);
            }
            rows.push(row);
        }
        self.write(prefill, &moves);
        let (ours, theirs) = (self.len, width);
        if ours < theirs {
            self.left_pad(theirs - ours);
        }
        for mut row in rows {
            pad_row(&mut row, ours.saturating_sub(theirs), pl);
            self.rows.push(row);
        }
        self.len = ours.max(theirs);
        self.table = None;
    }

    /// Copies the prefill's positions `moves` (from, to) into the pools: one gather and one
    /// scatter a layer's keys and values.
    fn write(&mut self, prefill: &KvCache<B>, moves: &[(usize, usize)]) {
        if moves.is_empty() {
            return;
        }
        let device = self.pools[0].0.device();
        let column = |pick: fn(&(usize, usize)) -> usize| {
            let ids: Vec<i64> = moves.iter().map(|m| pick(m) as i64).collect();
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [moves.len()]), &device)
        };
        let (from, to) = (column(|m| m.0), column(|m| m.1));
        let to = to.reshape([moves.len(), 1]);
        let scatter = |pool: Tensor<B, 3>, x: Tensor<B, 4>| {
            let [b, h, s, d] = x.dims();
            let rows = x.swap_dims(1, 2).reshape([b * s, h, d]).select(0, from.clone()); // [n, KV, hd]
            pool.scatter_nd(to.clone(), rows, IndexingUpdateOp::Assign)
        };
        // Each pool moved into its scatter (held nowhere else), so it is written in place.
        self.pools = std::mem::take(&mut self.pools)
            .into_iter()
            .enumerate()
            .map(|(l, (kp, vp))| {
                let (k, v) = prefill.layer(l);
                (scatter(kp, k), scatter(vp, v))
            })
            .collect();
    }

    /// Adds `n` positions of padding before every row's (no memory: zero pages).
    pub fn left_pad(&mut self, n: usize) {
        let pl = self.page_len;
        self.rows.iter_mut().for_each(|r| pad_row(r, n, pl));
        self.len += n;
        self.table = None;
    }

    /// Drops the first `n` positions of every row (padding in all of them), and the pages
    /// that held only those.
    pub fn trim_front(&mut self, n: usize) {
        let n = n.min(self.len);
        let pl = self.page_len;
        let mut gone = Vec::new();
        for row in &mut self.rows {
            let s = row.shift + n;
            gone.extend(row.pages.drain(..s / pl));
            row.shift = s % pl;
        }
        gone.into_iter().for_each(|p| self.release(p));
        self.len -= n;
        self.table = None;
    }

    /// Keeps only the rows `keep` (in that order; none twice); the others' pages go back.
    pub fn select_rows(&mut self, keep: &[usize]) {
        let mut rows: Vec<Option<Row>> = std::mem::take(&mut self.rows).into_iter().map(Some).collect();
        self.rows = keep
            .iter()
            .filter_map(|&i| rows.get_mut(i).and_then(Option::take))
            .collect();
        for row in rows.into_iter().flatten() {
            row.pages.into_iter().for_each(|p| self.release(p));
        }
        if self.rows.is_empty() {
            self.len = 0;
        }
        self.table = None;
    }

    /// Gives every row pages for `t` more positions. When one needs a page, every row gets
    /// pages for a page's worth of positions more than that, where the cap allows: rows of
    /// different shifts then take pages at the same step, and the page table changes once a
    /// page, not at each row's page boundary. Under a cap that leaves no room for that, each
    /// row gets only what it needs ([`PagedKv::reserve_cost`]).
    pub fn reserve(&mut self, t: usize) {
        let (pl, need) = (self.page_len, self.len + t);
        if self.reserve_cost(t) == 0 {
            return;
        }
        let ahead = self.pages_short(need + pl);
        let want = if self.pages_free().is_none_or(|f| ahead <= f) {
            need + pl
        } else {
            need
        };
        for i in 0..self.rows.len() {
            while self.rows[i].room(pl) < want {
                let page = self.alloc();
                self.rows[i].pages.push(page);
            }
        }
        self.table = None;
    }

    /// The fewest pages [`PagedKv::reserve`] of `t` positions takes.
    pub fn reserve_cost(&self, t: usize) -> usize {
        self.pages_short(self.len + t)
    }

    /// Pages the rows lack to hold `positions` each.
    fn pages_short(&self, positions: usize) -> usize {
        let pl = self.page_len;
        self.rows
            .iter()
            .map(|r| positions.saturating_sub(r.room(pl)).div_ceil(pl))
            .sum()
    }

    /// The page table [B * ld], ld and the shifts [B] on `device`, uploaded when the pages
    /// changed.
    fn device_table(&mut self, device: &B::Device) -> DeviceTable<B> {
        if let Some(t) = &self.table {
            return t.clone();
        }
        let ld = self.rows.iter().map(|r| r.pages.len()).max().unwrap_or(0).max(1);
        let mut table = vec![ZERO as i32; self.rows.len() * ld];
        for (r, row) in self.rows.iter().enumerate() {
            for (j, &p) in row.pages.iter().enumerate() {
                table[r * ld + j] = p as i32;
            }
        }
        let shift: Vec<i32> = self.rows.iter().map(|r| r.shift as i32).collect();
        let b = self.rows.len();
        let t = DeviceTable {
            table: Tensor::from_data(TensorData::new(table, [b * ld]), device),
            ld,
            shift: Tensor::from_data(TensorData::new(shift, [b]), device),
        };
        self.table = Some(t.clone());
        t
    }

    /// A decoding step of every row at position `len` ([`PagedKv::reserve`] gave them room):
    /// the pools move into the step, with the page table on `device` and each row's slot for
    /// the new position. [`PagedKv::end_step`] takes them back.
    pub(crate) fn begin_step(&mut self, device: &B::Device) -> PagedStep<B> {
        let table = self.device_table(device);
        let slots = self
            .rows
            .iter()
            .map(|r| r.slot(self.len, self.page_len) as i64)
            .collect();
        PagedStep {
            slots,
            slot_tensor: None,
            pools: std::mem::take(&mut self.pools).into_iter().map(Some).collect(),
            table,
            page_len: self.page_len,
            at: self.len,
        }
    }

    /// Takes back the pools of `step`, which now hold position `len` of every row.
    pub(crate) fn end_step(&mut self, step: PagedStep<B>) {
        self.pools = step
            .pools
            .into_iter()
            .map(|p| p.expect("a step's pools come back"))
            .collect();
        self.len += 1;
    }

    /// A free page, the pools grown when there is none: doubled, up to the cap (past it
    /// only where a caller took more than the costs allowed).
    fn alloc(&mut self) -> u32 {
        if self.free.is_empty() {
            let held = self.refs.len();
            let cap = self.limit.map_or(usize::MAX, |l| (l + 1).max(held + 1));
            self.grow((held * 2).max(16).min(cap));
        }
        let page = self.free.pop().expect("the pools just grew");
        self.refs[page as usize] = 1;
        self.used += 1;
        page
    }

    fn release(&mut self, page: u32) {
        if page == ZERO {
            return;
        }
        let n = &mut self.refs[page as usize];
        *n -= 1;
        if *n == 0 {
            self.free.push(page);
            self.used -= 1;
        }
    }

    /// Grows the pools to `pages` pages, the new ones zeros.
    fn grow(&mut self, pages: usize) {
        let old = self.refs.len();
        if pages <= old {
            return;
        }
        let more = (pages - old) * self.page_len;
        for (k, v) in &mut self.pools {
            let [_, h, d] = k.dims();
            let options = (&k.device(), k.dtype());
            *k = Tensor::cat(vec![k.clone(), Tensor::zeros([more, h, d], options)], 0);
            *v = Tensor::cat(vec![v.clone(), Tensor::zeros([more, h, d], options)], 0);
        }
        self.refs.resize(pages, 0);
        // Lower pages first, so a small batch stays at the pools' start.
        self.free.extend((old..pages).rev().map(|p| p as u32));
        self.table = None;
    }
}

/// One decoding step over a [`PagedKv`]'s pages ([`PagedKv::begin_step`]): the pools, the
/// page table and where each row's new position goes.
pub struct PagedStep<B: Backend> {
    /// Each layer's pools, taken out while a write replaces them (so that they are held
    /// nowhere else and written in place).
    pools: Vec<Option<(Tensor<B, 3>, Tensor<B, 3>)>>,
    table: DeviceTable<B>,
    /// Each row's slot for the new position; on the device ([B, 1]) once a write needs it
    /// (the fused step does not).
    slots: Vec<i64>,
    slot_tensor: Option<Tensor<B, 2, Int>>,
    page_len: usize,
    /// The new position.
    pub(crate) at: usize,
}

impl<B: ModelKernels> PagedStep<B> {
    pub(crate) fn pages(&self) -> PageTable<'_, B> {
        PageTable {
            table: &self.table.table,
            ld: self.table.ld,
            shift: &self.table.shift,
            page_len: self.page_len,
        }
    }

    /// The pools, moved out for a fused step; [`PagedStep::put_pools`] returns them.
    pub(crate) fn take_pools(&mut self) -> CacheBuffers<B> {
        std::mem::take(&mut self.pools)
            .into_iter()
            .map(|p| p.expect("a step's pools"))
            .collect()
    }

    pub(crate) fn put_pools(&mut self, pools: CacheBuffers<B>) {
        self.pools = pools.into_iter().map(Some).collect();
    }

    /// Writes `layer`'s keys and values of the new position, k and v [B, KV, 1, hd].
    pub(crate) fn write(&mut self, layer: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        let (kp, vp) = self.pools[layer].take().expect("a step's pools");
        let slots = self.slots.as_slice();
        let to = self
            .slot_tensor
            .get_or_insert_with(|| {
                Tensor::from_data(TensorData::new(slots.to_vec(), [slots.len(), 1]), &kp.device())
            })
            .clone();
        let put = |pool: Tensor<B, 3>, x: Tensor<B, 4>| {
            let [b, h, _, d] = x.dims();
            pool.scatter_nd(to.clone(), x.reshape([b, h, d]), IndexingUpdateOp::Assign)
        };
        self.pools[layer] = Some((put(kp, k), put(vp, v)));
    }

    /// Attention of q [B, H, 1, hd] over positions 0..=at of every row in `layer`'s pages
    /// ([`ModelKernels::paged_attention`]).
    pub(crate) fn attend(&self, layer: usize, q: Tensor<B, 4>, keys: Option<&KeyRanges<B>>) -> Tensor<B, 4> {
        let (k, v) = self.pools[layer].as_ref().expect("a step's pools");
        B::paged_attention(q, k.clone(), v.clone(), &self.pages(), self.at + 1, keys)
    }
}

/// A page table on the device ([`PageTable`]'s tensors).
#[derive(Debug, Clone)]
struct DeviceTable<B: Backend> {
    table: Tensor<B, 1, Int>,
    ld: usize,
    shift: Tensor<B, 1, Int>,
}

/// Where each page of an admitted row comes from ([`plan_pages`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum PagePlan {
    /// Wholly in the row's left padding: the zero page.
    Zero,
    /// The same page of the earlier row `k`, a sample of the same prompt.
    Share(usize),
    /// A page of its own, filled from the prefill.
    New,
}

/// Each admitted row's pages, for a prefill of `width` positions whose row d is left-padded
/// by `pads[d]`, row i holding row `sources[i]`. Pages wholly filled by a prompt are shared
/// by its samples; the last, partly filled one is each sample's own (they write into it).
fn plan_pages(width: usize, sources: &[usize], pads: &[usize], pl: usize) -> Vec<Vec<PagePlan>> {
    let (pages, shared) = (width.div_ceil(pl), width / pl);
    (0..sources.len())
        .map(|i| {
            let src = sources[i];
            let sibling = sources[..i].iter().position(|&s| s == src);
            let pad = pads.get(src).copied().unwrap_or(0);
            (0..pages)
                .map(|j| match sibling {
                    _ if (j + 1) * pl <= pad => PagePlan::Zero,
                    Some(k) if j < shared => PagePlan::Share(k),
                    _ => PagePlan::New,
                })
                .collect()
        })
        .collect()
}

/// Pads `row` by `n` positions on the left: zero pages before its first, its shift moved
/// so that every position keeps its slot.
fn pad_row(row: &mut Row, n: usize, page_len: usize) {
    if n <= row.shift {
        row.shift -= n;
        return;
    }
    let pages = (n - row.shift).div_ceil(page_len);
    row.pages.splice(0..0, std::iter::repeat_n(ZERO, pages));
    row.shift = row.shift + pages * page_len - n;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CausalLm;
    use crate::transformer::Context;
    use burn::backend::Flex;
    use distill_hf::config::DecoderConfig;

    type B = Flex;

    /// Left-padded prefill of `prompts` into a contiguous cache; (cache, pads).
    fn prefill(model: &CausalLm<B>, prompts: &[&[u32]]) -> (KvCache<B>, Vec<usize>) {
        let device = Default::default();
        let width = prompts.iter().map(|p| p.len()).max().unwrap();
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let ids: Vec<i64> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(0, width - p.len()).chain(p.iter().map(|&t| i64::from(t))))
            .collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [prompts.len(), width]), &device);
        let ctx = Context::left_padded(&model.rotary, &pads, width, 0, &device);
        let mut cache = model.new_cache();
        model.hidden_states_with(input, &ctx, Some(&mut cache));
        (cache, pads)
    }

    /// The last position's logits of `tokens` by a forward over all of them, no cache.
    fn alone(model: &CausalLm<B>, tokens: &[u32]) -> Vec<f32> {
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &Default::default());
        let logits = model.forward(input); // [1, T, V]
        let t = tokens.len();
        logits
            .narrow(1, t - 1, 1)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap()
    }

    /// Rows joining at other lengths (either side padded), two samples of one prompt sharing
    /// its pages, a row leaving and common padding trimmed, all across many pages of 4 slots:
    /// every step's logits for every row equal that row's sequence run alone, and pages
    /// return when rows leave.
    #[test]
    fn paged_decoding_equals_each_row_decoded_alone() {
        let config = DecoderConfig::from_dir(&crate::test_util::fixtures().join("tiny-qwen2")).unwrap();
        let device = Default::default();
        let model = CausalLm::<B>::init(&config, &device).for_decoding();
        let mut cache = PagedKv::<B>::with_page_len(config.num_hidden_layers, 4);
        // Each row's tokens so far and its left padding in the cache.
        let mut rows: Vec<(Vec<u32>, usize)> = Vec::new();
        let admit = |cache: &mut PagedKv<B>,
                     rows: &mut Vec<(Vec<u32>, usize)>,
                     prompts: &[&[u32]],
                     sources: &[usize]| {
            let (pre, pads) = prefill(&model, prompts);
            let (ours, theirs) = (cache.len(), pre.len());
            if !rows.is_empty() && ours < theirs {
                rows.iter_mut().for_each(|r| r.1 += theirs - ours);
            }
            let extra = if rows.is_empty() {
                0
            } else {
                ours.saturating_sub(theirs)
            };
            let (cost, before) = (cache.admit_cost(pre.len(), sources, &pads), cache.pages_in_use());
            cache.admit(&pre, sources, &pads);
            assert_eq!(
                cache.pages_in_use() - before,
                cost,
                "admit took what admit_cost said"
            );
            rows.extend(sources.iter().map(|&s| (prompts[s].to_vec(), pads[s] + extra)));
        };
        let step = |cache: &mut PagedKv<B>, rows: &mut Vec<(Vec<u32>, usize)>, n: usize, salt: usize| {
            for i in 0..n {
                let ids: Vec<u32> = (0..rows.len())
                    .map(|r| ((i * 7 + r * 13 + salt) % 97 + 1) as u32)
                    .collect();
                let pads: Vec<usize> = rows.iter().map(|r| r.1).collect();
                let logits = model.decode_step(&ids, &pads, cache, &device); // [b, V]
                let v = logits.dims()[1];
                let got: Vec<f32> = logits.into_data().convert::<f32>().into_vec().unwrap();
                for (r, row) in rows.iter_mut().enumerate() {
                    row.0.push(ids[r]);
                    let want = alone(&model, &row.0);
                    let got = &got[r * v..(r + 1) * v];
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(worst < 1e-4, "step {i} (salt {salt}), row {r}: off by {worst}");
                }
            }
        };
        admit(
            &mut cache,
            &mut rows,
            &[&[5, 9, 14, 3, 8], &[1, 2, 3, 4, 5, 6, 7, 8, 9]],
            &[0, 1],
        );
        assert_eq!((cache.len(), cache.rows()), (9, 2));
        step(&mut cache, &mut rows, 6, 0);
        // Shorter rows join (they are padded), two of them samples of one prompt.
        let in_use = cache.pages_in_use();
        admit(
            &mut cache,
            &mut rows,
            &[&[40, 41, 42, 43, 44, 45, 46, 47, 48], &[7, 7]],
            &[0, 0, 1],
        );
        // 9 positions, 3 pages: the second sample shares the first's two full pages and has a
        // last page of its own; [7, 7], padded by 7, has the zero page first.
        assert_eq!(cache.pages_in_use() - in_use, 3 + 1 + 2);
        step(&mut cache, &mut rows, 5, 1);
        // A longer row joins: the running rows are padded.
        let long: Vec<u32> = (0..31).map(|i| (i * 5 % 89) as u32 + 1).collect();
        admit(&mut cache, &mut rows, &[&long], &[0]);
        assert_eq!(cache.len(), 31);
        step(&mut cache, &mut rows, 3, 2);
        // The long row and a sample leave; the padding all remaining rows share goes.
        let before = cache.pages_in_use();
        let keep = [0, 1, 3, 4];
        cache.select_rows(&keep);
        rows = keep.iter().map(|&r| rows[r].clone()).collect();
        assert!(cache.pages_in_use() < before, "pages of rows that left return");
        let common = rows.iter().map(|r| r.1).min().unwrap();
        assert!(common >= 4, "the test trims at least a page: {common}");
        let before = cache.pages_in_use();
        cache.trim_front(common);
        rows.iter_mut().for_each(|r| r.1 -= common);
        assert!(cache.pages_in_use() <= before);
        step(&mut cache, &mut rows, 9, 3);
        cache.select_rows(&[]);
        assert_eq!((cache.pages_in_use(), cache.len()), (0, 0));
    }

    /// Under a cap, a step's pages are only what each row needs (a page each, not a page
    /// ahead), reserve_cost says how many, and the pools never hold more than the cap.
    #[test]
    fn a_capped_cache_takes_only_the_pages_rows_need() {
        let config = DecoderConfig::from_dir(&crate::test_util::fixtures().join("tiny-qwen2")).unwrap();
        let device = Default::default();
        let model = CausalLm::<B>::init(&config, &device).for_decoding();
        let run = |limit: Option<usize>| {
            let mut cache = PagedKv::<B>::with_page_len(config.num_hidden_layers, 4);
            cache.set_page_limit(limit);
            let (pre, pads) = prefill(&model, &[&[3, 1, 4, 1, 5, 9, 2], &[2, 7, 1, 8, 2, 8, 1]]);
            cache.admit(&pre, &[0, 1], &pads);
            assert_eq!(cache.pages_in_use(), 4);
            assert_eq!(cache.reserve_cost(1), 0, "7 positions in 8 slots a row");
            model.decode_step(&[6, 6], &[0, 0], &mut cache, &device);
            assert_eq!(cache.reserve_cost(1), 2, "both rows are full at 8");
            model.decode_step(&[5, 3], &[0, 0], &mut cache, &device);
            (cache.pages_in_use(), cache.pages_free(), cache.refs.len())
        };
        // Uncapped: each row takes a page ahead as well.
        assert_eq!(run(None).0, 8);
        let (used, free, held) = run(Some(6));
        assert_eq!((used, free), (6, Some(0)));
        assert!(held <= 7, "the pools hold {held} pages (the zero page and 6)");
    }
}
