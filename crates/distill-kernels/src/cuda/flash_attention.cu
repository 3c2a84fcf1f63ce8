/* Flash attention for bf16 Q, K, V (FlashAttention-2's algorithm), forward and backward, on
 * tensor cores through mma.sync (sm_80+). Compiled at run time by NVRTC with HD (the head
 * dim, a multiple of 16) defined; see flash.rs.
 *
 * Layout: a tensor is [B, heads, rows, HD] with the head dim contiguous and the other three
 * strides given (elements, multiples of 8, 16-byte aligned base), so the views the model makes
 * ([B, T, H, hd] memory seen as [B, H, T, hd]) are read in place. Query head h reads K/V head
 * h / groups (grouped-query attention without repeating K and V).
 *
 * Masking: query i of batch row b sees the keys lo[i] ..= hi[i] of its row (int arrays
 * [R, T], R = 1 shared or R = B); null lo/hi means every key. That describes causal, packed
 * (documents) and left-padded batches alike, and lets a tile skip key blocks it cannot see.
 *
 * Work split: a CTA is 4 warps; a warp owns 16 rows of the tile (queries in the forward and
 * dQ kernels, keys in the dK/dV kernel). Each warp computes its rows' scores with
 * m16n8k16 MMAs; the f32 accumulator layout of one score block is the bf16 A-operand layout of
 * the next MMA, so P and dS never leave registers. Softmax is online in log2 units. The tiles
 * each loop streams (K/V, or Q/dO for dK/dV) are double-buffered and loaded with cp.async, so
 * the next tile lands while the warps compute on the current one; tiles every row of which
 * sees every key skip the mask.
 *
 * Around the backward: flash_delta (rowsum(dO ∘ O), which both backward kernels read) before
 * it, flash_sum_groups (each K/V head's dK/dV partials summed over its query heads) after it.
 */
typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef long long i64;

#ifndef HD
#error "define HD, the head dim"
#endif
#define TILE 64          /* rows of a tile: 4 warps x 16 */
#define LD (HD + 8)      /* shared row stride: +16 bytes keeps fragment loads off one bank */
#define NT 128
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define NEG_INF __int_as_float(0xff800000)
#define NO_KEY 0x7fffffff

/* Two floats as a bf16 pair, round to nearest even; `lo` in the low half. */
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

/* c (16x8 f32) += a (16x16 bf16, row) * b (16x8 bf16, col). */
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Asynchronous copies (cp.async, sm_80+): global to shared without a pass through registers,
 * so the next tile loads while the warps compute on the current one. `valid` false fills
 * zeros and reads nothing. */
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"((u32)__cvta_generic_to_shared(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"((u32)__cvta_generic_to_shared(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::); }
/* Wait until at most `n` of this thread's committed groups are in flight. */
template <int n> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(n)); }

/* Rows row0 .. row0+TILE of one head (row stride `st`) into a shared tile, zeros past `n`;
 * asynchronous: visible to the CTA after cp_wait and a barrier. */
__device__ __forceinline__ void load_tile(bf16_t* tile, const bf16_t* head, i64 st, int row0, int n) {
    const int chunks = HD / 8; /* 16-byte chunks per row */
    for (int c = threadIdx.x; c < TILE * chunks; c += NT) {
        const int r = c / chunks, col = (c - r * chunks) * 8;
        const bool in = row0 + r < n;
        cp_async16(tile + r * LD + col, in ? head + (i64)(row0 + r) * st + col : head, in);
    }
}

/* The shared-memory address of p, for ldmatrix. The B fragments are loaded with ldmatrix: 8x8
 * blocks of b16 whose rows (16 bytes, 16-byte aligned: LD, n0 and kk * 16 are multiples of 8)
 * the lanes address, 8 lanes a block; with LD = HD + 8 the 8 rows of a block fall in distinct
 * banks. The A fragments keep 32-bit loads: as ldmatrix (volatile, so not rescheduled) they
 * took the dK/dV kernel from 168 to 218 registers at HD 64, one CTA per SM fewer. */
__device__ __forceinline__ u32 smem_addr(const bf16_t* p) { return (u32)__cvta_generic_to_shared(p); }

/* A operand: tile rows r0..r0+16, columns kk*16..+16. */
__device__ __forceinline__ void frag_a(u32* a, const bf16_t* tile, int r0, int kk, int g, int t) {
    const bf16_t* p = tile + (r0 + g) * LD + kk * 16 + t * 2;
    a[0] = *(const u32*)p;
    a[1] = *(const u32*)(p + 8 * LD);
    a[2] = *(const u32*)(p + 8);
    a[3] = *(const u32*)(p + 8 * LD + 8);
}

/* B operand (k16 x n8) = tileᵀ: B[k][n] = tile[n0 + n][kk*16 + k]. Blocks: tile rows n0..n0+8
 * at columns kk*16 and kk*16 + 8. */
__device__ __forceinline__ void frag_bt(u32& b0, u32& b1, const bf16_t* tile, int n0, int kk, int g, int t) {
    const int lane = threadIdx.x & 31;
    const u32 addr = smem_addr(tile + (n0 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(b0), "=r"(b1) : "r"(addr));
}

/* B operand (k16 x n8) = tile: B[k][n] = tile[k0 + k][n0 + n], a column of the tile per
 * register pair. ldmatrix .trans reads the blocks at rows k0 and k0 + 8 transposed and hands
 * each lane B[2t, 2t+1][g]: one instruction where element-wise loads took four and two packs. */
__device__ __forceinline__ void frag_b(u32& b0, u32& b1, const bf16_t* tile, int k0, int n0, int g, int t) {
    const int lane = threadIdx.x & 31;
    const u32 addr = smem_addr(tile + (k0 + (lane & 15)) * LD + n0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(b0), "=r"(b1)
                 : "r"(addr));
}

/* The A operand for columns 16j..16j+16 from accumulator blocks 2j and 2j+1 (16x8 each). */
__device__ __forceinline__ void acc_to_a(u32* a, const float (*c)[4], int j) {
    a[0] = pack2(c[2 * j][0], c[2 * j][1]);
    a[1] = pack2(c[2 * j][2], c[2 * j][3]);
    a[2] = pack2(c[2 * j + 1][0], c[2 * j + 1][1]);
    a[3] = pack2(c[2 * j + 1][2], c[2 * j + 1][3]);
}

/* s (16 x TILE) = a (16 x HD, A fragments) @ tileᵀ, tile: TILE rows of HD. */
__device__ __forceinline__ void scores(float (*s)[4], const u32 (*a)[4], const bf16_t* tile, int g, int t) {
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            u32 b0, b1;
            frag_bt(b0, b1, tile, n * 8, kk, g, t);
            mma(s[n], a[kk], b0, b1);
        }
    }
}

/* acc (16 x HD) += c (16 x TILE, f32 accumulator blocks, rounded to bf16) @ tile. */
__device__ __forceinline__ void accumulate(float (*acc)[4], const float (*c)[4], const bf16_t* tile, int g, int t) {
#pragma unroll
    for (int j = 0; j < TILE / 16; j++) {
        u32 a[4];
        acc_to_a(a, c, j);
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            u32 b0, b1;
            frag_b(b0, b1, tile, j * 16, n * 8, g, t);
            mma(acc[n], a, b0, b1);
        }
    }
}

__device__ __forceinline__ void zero(float (*acc)[4], int blocks) {
    for (int n = 0; n < blocks; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

/* Row i's visible keys [lo, hi]; an empty range (NO_KEY, -1) past the end. */
__device__ __forceinline__ void key_range(const int* lo, const int* hi, int i, int t_len, int s_len, int& a, int& z) {
    if (i >= t_len) { a = NO_KEY; z = -1; return; }
    a = lo ? lo[i] : 0;
    z = hi ? min(hi[i], s_len - 1) : s_len - 1;
}

/* Shared prologue of the two query-tile kernels: the key ranges of the `rows` queries from q0
 * into slo/shi; into span[0..2] the span of keys any of them sees, and into span[2..4] the keys
 * every one of them sees (max lo, min hi): a key tile inside those needs no mask. */
__device__ __forceinline__ void query_ranges(const int* lo, const int* hi, int q0, int rows, int t_len,
                                             int s_len, int* slo, int* shi, int* span) {
    if (threadIdx.x == 0) { span[0] = NO_KEY; span[1] = -1; span[2] = -1; span[3] = NO_KEY; }
    __syncthreads();
    if (threadIdx.x < rows) {
        int a, z;
        key_range(lo, hi, q0 + threadIdx.x, t_len, s_len, a, z);
        slo[threadIdx.x] = a;
        shi[threadIdx.x] = z;
        if (z >= a) { atomicMin(&span[0], a); atomicMax(&span[1], z); }
        atomicMax(&span[2], a);
        atomicMin(&span[3], z);
    }
}

/* Scores of keys k0.. outside each row's range to -inf (fragment layout of `scores`). */
__device__ __forceinline__ void mask_scores(float (*s)[4], int k0, const int* lo_r, const int* hi_r, int t) {
#pragma unroll
    for (int n = 0; n < TILE / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = e >> 1, j = k0 + n * 8 + t * 2 + (e & 1);
            if (j < lo_r[r] || j > hi_r[r]) s[n][e] = NEG_INF;
        }
}

/* Ends a pipeline stage: commits the copies issued since the last one, waits for all but
 * that newest group, and makes what landed visible to the CTA. */
__device__ __forceinline__ void next_stage() {
    cp_commit();
    cp_wait<1>();
    __syncthreads();
}

/* The key tiles a query tile's span (span[0..2], from query_ranges) reaches: first (a tile
 * start) ..= last; none when first > last. */
__device__ __forceinline__ void key_tiles(const int* span, int s_len, int& first, int& last) {
    first = span[0] < 0 ? 0 : span[0] / TILE * TILE;
    last = min(span[1], s_len - 1);
}

/* Keys k0 .. k0+TILE of K and V into buffer `buf` of sk and sv ([2][TILE * LD] each), if
 * k0 <= last. */
__device__ __forceinline__ void load_kv(bf16_t* sk, bf16_t* sv, int buf, const bf16_t* kh, i64 k_t,
                                        const bf16_t* vh, i64 v_t, int k0, int last, int s_len) {
    if (k0 > last) return;
    load_tile(sk + buf * TILE * LD, kh, k_t, k0, s_len);
    load_tile(sv + buf * TILE * LD, vh, v_t, k0, s_len);
}

#define HEAD(p, b, h, sb, sh) ((p) + (i64)(b) * (sb) + (i64)(h) * (sh))

/* Forward: O = softmax(scale Q Kᵀ, masked) V and lse (natural log) per query, [B, H, T].
 * Grid (query tiles of QT = 128, H, B); heavy (late) query tiles first. Each warp owns 32
 * query rows (two m16 blocks), so every K and V fragment read from shared memory feeds two
 * MMAs. Shared memory: the Q tile, then K and V tiles, two of each, the next pair loading
 * while the warps work on the current one. */
#define QT (2 * TILE)
__device__ __forceinline__ void softmax_step(float (*s)[4], float (*acc)[4], float* m, float* l, float sl2) {
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int n = 0; n < TILE / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            s[n][e] *= sl2;
            mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        }
    float base[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float mn = fmaxf(m[r], mx[r]);
        base[r] = mn == NEG_INF ? 0.f : mn;
        alpha[r] = exp2f(m[r] - base[r]);
        m[r] = mn;
        l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < TILE / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float p = exp2f(s[n][e] - base[e >> 1]);
            s[n][e] = p;
            l[e >> 1] += p;
        }
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        acc[n][0] *= alpha[0]; acc[n][1] *= alpha[0];
        acc[n][2] *= alpha[1]; acc[n][3] *= alpha[1];
    }
}

extern "C" __global__ void __launch_bounds__(NT) flash_fwd(
    const bf16_t* q, i64 q_b, i64 q_h, i64 q_t,
    const bf16_t* k, i64 k_b, i64 k_h, i64 k_t,
    const bf16_t* v, i64 v_b, i64 v_h, i64 v_t,
    bf16_t* o, i64 o_b, i64 o_h, i64 o_t,
    float* lse, const int* lo, const int* hi, int ranges_per_row,
    int heads, int groups, int t_len, int s_len, float scale)
{
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* sq = (bf16_t*)smem;            /* [QT * LD] */
    bf16_t* sk = sq + QT * LD;             /* [2][TILE * LD] */
    bf16_t* sv = sk + 2 * TILE * LD;       /* [2][TILE * LD] */
    __shared__ int slo[QT], shi[QT], span[4];
    const int q0 = (gridDim.x - 1 - blockIdx.x) * QT, h = blockIdx.y, b = blockIdx.z, kvh = h / groups;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, r0 = warp * 32;
    const i64 roff = ranges_per_row ? (i64)b * t_len : 0;
    lo = lo ? lo + roff : lo;
    hi = hi ? hi + roff : hi;
    const bf16_t* kh = HEAD(k, b, kvh, k_b, k_h);
    const bf16_t* vh = HEAD(v, b, kvh, v_b, v_h);

    query_ranges(lo, hi, q0, QT, t_len, s_len, slo, shi, span);
    const bf16_t* qh = HEAD(q, b, h, q_b, q_h);
    load_tile(sq, qh, q_t, q0, t_len);
    load_tile(sq + TILE * LD, qh, q_t, q0 + TILE, t_len);
    cp_commit();
    __syncthreads();
    int first, last;
    key_tiles(span, s_len, first, last);
    load_kv(sk, sv, 0, kh, k_t, vh, v_t, first, last, s_len);
    cp_commit();
    const int lo_r[4] = {slo[r0 + g], slo[r0 + g + 8], slo[r0 + 16 + g], slo[r0 + 24 + g]};
    const int hi_r[4] = {shi[r0 + g], shi[r0 + g + 8], shi[r0 + 16 + g], shi[r0 + 24 + g]};
    const int seen_by_all[2] = {span[2], span[3]};

    const float sl2 = scale * LOG2E;
    float acc[2][HD / 8][4];
    zero(acc[0], HD / 8);
    zero(acc[1], HD / 8);
    float m[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF}, l[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = first, buf = 0; k0 <= last; k0 += TILE, buf ^= 1) {
        load_kv(sk, sv, buf ^ 1, kh, k_t, vh, v_t, k0 + TILE, last, s_len);
        next_stage();
        const bf16_t* kt = sk + buf * TILE * LD;
        const bf16_t* vt = sv + buf * TILE * LD;
        float s[2][TILE / 8][4];
        zero(s[0], TILE / 8);
        zero(s[1], TILE / 8);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            u32 a0[4], a1[4];
            frag_a(a0, sq, r0, kk, g, t);
            frag_a(a1, sq, r0 + 16, kk, g, t);
#pragma unroll
            for (int n = 0; n < TILE / 8; n++) {
                u32 b0, b1;
                frag_bt(b0, b1, kt, n * 8, kk, g, t);
                mma(s[0][n], a0, b0, b1);
                mma(s[1][n], a1, b0, b1);
            }
        }
        if (k0 < seen_by_all[0] || k0 + TILE - 1 > seen_by_all[1]) {
            mask_scores(s[0], k0, lo_r, hi_r, t);
            mask_scores(s[1], k0, lo_r + 2, hi_r + 2, t);
        }
        softmax_step(s[0], acc[0], m, l, sl2);
        softmax_step(s[1], acc[1], m + 2, l + 2, sl2);
#pragma unroll
        for (int j = 0; j < TILE / 16; j++) {
            u32 a0[4], a1[4];
            acc_to_a(a0, s[0], j);
            acc_to_a(a1, s[1], j);
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                u32 b0, b1;
                frag_b(b0, b1, vt, j * 16, n * 8, g, t);
                mma(acc[0][n], a0, b0, b1);
                mma(acc[1][n], a1, b0, b1);
            }
        }
        __syncthreads();
    }
    cp_wait<0>();
#pragma unroll
    for (int mm = 0; mm < 2; mm++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float lr = l[2 * mm + r];
            lr += __shfl_xor_sync(0xffffffffu, lr, 1);
            lr += __shfl_xor_sync(0xffffffffu, lr, 2);
            const int i = q0 + r0 + 16 * mm + g + 8 * r;
            if (i >= t_len) continue;
            const float inv = lr > 0.f ? 1.f / lr : 0.f;
            bf16_t* orow = HEAD(o, b, h, o_b, o_h) + (i64)i * o_t;
#pragma unroll
            for (int n = 0; n < HD / 8; n++)
                *(u32*)(orow + n * 8 + t * 2) = pack2(acc[mm][n][2 * r] * inv, acc[mm][n][2 * r + 1] * inv);
            if (t == 0) lse[((i64)b * heads + h) * t_len + i] = lr > 0.f ? (m[2 * mm + r] + log2f(lr)) * LN2 : NEG_INF;
        }
}

/* dQ = scale dS K with dS = P (dP - delta), P = exp(scale Q Kᵀ - lse), dP = dO Vᵀ.
 * lse, delta: [B, H, T] f32. Grid (query tiles, H, B). Shared memory as the forward's. */
extern "C" __global__ void __launch_bounds__(NT) flash_bwd_dq(
    const bf16_t* q, i64 q_b, i64 q_h, i64 q_t,
    const bf16_t* k, i64 k_b, i64 k_h, i64 k_t,
    const bf16_t* v, i64 v_b, i64 v_h, i64 v_t,
    const bf16_t* dout, i64 do_b, i64 do_h, i64 do_t,
    const float* lse, const float* delta,
    bf16_t* dq, i64 dq_b, i64 dq_h, i64 dq_t,
    const int* lo, const int* hi, int ranges_per_row,
    int heads, int groups, int t_len, int s_len, float scale)
{
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* sk = (bf16_t*)smem;       /* [2][TILE * LD] */
    bf16_t* sv = sk + 2 * TILE * LD;  /* [2][TILE * LD] */
    __shared__ int slo[TILE], shi[TILE], span[4];
    const int q0 = (gridDim.x - 1 - blockIdx.x) * TILE, h = blockIdx.y, b = blockIdx.z, kvh = h / groups;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, r0 = warp * 16;
    const i64 roff = ranges_per_row ? (i64)b * t_len : 0;
    lo = lo ? lo + roff : lo;
    hi = hi ? hi + roff : hi;
    const bf16_t* kh = HEAD(k, b, kvh, k_b, k_h);
    const bf16_t* vh = HEAD(v, b, kvh, v_b, v_h);

    query_ranges(lo, hi, q0, TILE, t_len, s_len, slo, shi, span);
    /* Q and dO in the second buffers, the first K/V tiles in the first. */
    load_tile(sk + TILE * LD, HEAD(q, b, h, q_b, q_h), q_t, q0, t_len);
    load_tile(sv + TILE * LD, HEAD(dout, b, h, do_b, do_h), do_t, q0, t_len);
    cp_commit();
    __syncthreads();
    int first, last;
    key_tiles(span, s_len, first, last);
    load_kv(sk, sv, 0, kh, k_t, vh, v_t, first, last, s_len);
    next_stage();
    u32 qa[HD / 16][4], da[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        frag_a(qa[kk], sk + TILE * LD, r0, kk, g, t);
        frag_a(da[kk], sv + TILE * LD, r0, kk, g, t);
    }
    int lo_r[2], hi_r[2];
    float lse_r[2], delta_r[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = r0 + g + 8 * r, i = q0 + row;
        lo_r[r] = slo[row];
        hi_r[r] = shi[row];
        const i64 at = ((i64)b * heads + h) * t_len + i;
        lse_r[r] = i < t_len ? lse[at] * LOG2E : 0.f;
        delta_r[r] = i < t_len ? delta[at] : 0.f;
    }
    const int seen_by_all[2] = {span[2], span[3]};
    __syncthreads();

    const float sl2 = scale * LOG2E;
    float acc[HD / 8][4];
    zero(acc, HD / 8);
    for (int k0 = first, buf = 0; k0 <= last; k0 += TILE, buf ^= 1) {
        load_kv(sk, sv, buf ^ 1, kh, k_t, vh, v_t, k0 + TILE, last, s_len);
        next_stage();
        const bf16_t* kt = sk + buf * TILE * LD;
        const bf16_t* vt = sv + buf * TILE * LD;
        float s[TILE / 8][4], dp[TILE / 8][4];
        scores(s, qa, kt, g, t);
        scores(dp, da, vt, g, t);
        if (k0 >= seen_by_all[0] && k0 + TILE - 1 <= seen_by_all[1]) {
#pragma unroll
            for (int n = 0; n < TILE / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e >> 1;
                    dp[n][e] = exp2f(s[n][e] * sl2 - lse_r[r]) * (dp[n][e] - delta_r[r]);
                }
        } else {
#pragma unroll
            for (int n = 0; n < TILE / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e >> 1, j = k0 + n * 8 + t * 2 + (e & 1);
                    const bool seen = j >= lo_r[r] && j <= hi_r[r];
                    const float p = seen ? exp2f(s[n][e] * sl2 - lse_r[r]) : 0.f;
                    dp[n][e] = seen ? p * (dp[n][e] - delta_r[r]) : 0.f;
                }
        }
        accumulate(acc, dp, kt, g, t);
        __syncthreads();
    }
    cp_wait<0>();
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = q0 + r0 + g + 8 * r;
        if (i >= t_len) continue;
        bf16_t* row = HEAD(dq, b, h, dq_b, dq_h) + (i64)i * dq_t;
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
            *(u32*)(row + n * 8 + t * 2) = pack2(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
    }
}

/* The first and last query of [0, t_len) that sees a key of k0 ..= kmax, into *first and
 * *last (first > last: none). Each round reads 8 queries a thread at once, from the start
 * (and then from the end) until it finds one, so a causal mask costs a round or two where a
 * scan tile by tile took a barrier and a load's latency per tile. */
__device__ void seen_by(const int* lo, const int* hi, int t_len, int s_len, int k0, int kmax, int* first, int* last) {
    __shared__ int found[2];
    if (!lo && !hi) { *first = 0; *last = t_len - 1; return; }
    if (threadIdx.x == 0) { found[0] = NO_KEY; found[1] = -1; }
    __syncthreads();
    const int step = NT * 8;
    for (int base = 0; base < t_len; base += step) {
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = base + u * NT + threadIdx.x;
            if (i < t_len) {
                const int a = lo ? lo[i] : 0, z = hi ? hi[i] : s_len - 1;
                if (a <= z && a <= kmax && z >= k0) atomicMin(&found[0], i);
            }
        }
        __syncthreads();
        if (found[0] != NO_KEY) break;
    }
    for (int top = t_len - 1; found[0] != NO_KEY && top >= 0; top -= step) {
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = top - u * NT - (int)threadIdx.x;
            if (i >= 0) {
                const int a = lo ? lo[i] : 0, z = hi ? hi[i] : s_len - 1;
                if (a <= z && a <= kmax && z >= k0) atomicMax(&found[1], i);
            }
        }
        __syncthreads();
        if (found[1] >= 0) break;
    }
    *first = found[0];
    *last = found[1];
}

/* One query tile's operands for the dK/dV kernel, asynchronously: Q and dO rows, and each
 * query's key range, lse and delta (lse lands in natural log and is scaled to log2 once
 * landed; ranges not clamped to s_len). */
struct QueryTile {
    int lo[TILE], hi[TILE];
    float lse[TILE], delta[TILE];
};

__device__ __forceinline__ void load_query_tile(QueryTile* m, bf16_t* sq, bf16_t* sdo, const bf16_t* qh, i64 q_t,
                                                const bf16_t* doh, i64 do_t, const int* lo, const int* hi,
                                                const float* lse, const float* delta, int q0, int t_len, int s_len) {
    load_tile(sq, qh, q_t, q0, t_len);
    load_tile(sdo, doh, do_t, q0, t_len);
    if (threadIdx.x < TILE) {
        const int x = threadIdx.x, i = q0 + x;
        if (i < t_len) {
            if (lo) cp_async4(&m->lo[x], lo + i, true); else m->lo[x] = 0;
            if (hi) cp_async4(&m->hi[x], hi + i, true); else m->hi[x] = s_len - 1;
            cp_async4(&m->lse[x], lse + i, true);
            cp_async4(&m->delta[x], delta + i, true);
        } else {
            m->lo[x] = NO_KEY; m->hi[x] = -1; m->lse[x] = 0.f; m->delta[x] = 0.f;
        }
    }
}

/* dV = Pᵀ dO and dK = scale dSᵀ Q for one tile of keys and one query head, summed over every
 * query tile that sees it; f32 partials per query head, [B, H, S, HD], which the caller sums
 * over each K/V head's group (a CTA per query head keeps the grid wide under GQA). A warp
 * computes its 16 keys' transposed scores Sᵀ = K Qᵀ, so Pᵀ and dSᵀ are A operands in
 * registers. Grid (key tiles, H, B); key tile 0, which every later query sees, first.
 * Shared memory: the K and V tiles, and two Q and dO tiles, the next pair loading while the
 * warps work on the current one. */
extern "C" __global__ void __launch_bounds__(NT) flash_bwd_dkdv(
    const bf16_t* q, i64 q_b, i64 q_h, i64 q_t,
    const bf16_t* k, i64 k_b, i64 k_h, i64 k_t,
    const bf16_t* v, i64 v_b, i64 v_h, i64 v_t,
    const bf16_t* dout, i64 do_b, i64 do_h, i64 do_t,
    const float* lse, const float* delta,
    float* dk, i64 dk_b, i64 dk_h, i64 dk_t,
    float* dv, i64 dv_b, i64 dv_h, i64 dv_t,
    const int* lo, const int* hi, int ranges_per_row,
    int heads, int groups, int t_len, int s_len, float scale)
{
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* sk = (bf16_t*)smem;
    bf16_t* sv = sk + TILE * LD;
    bf16_t* sq = sv + TILE * LD;       /* [2][TILE * LD] */
    bf16_t* sdo = sq + 2 * TILE * LD;  /* [2][TILE * LD] */
    __shared__ QueryTile meta[2];
    const int k0 = blockIdx.x * TILE, hq = blockIdx.y, b = blockIdx.z, kvh = hq / groups;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, r0 = warp * 16;
    const i64 roff = ranges_per_row ? (i64)b * t_len : 0;
    lo = lo ? lo + roff : lo;
    hi = hi ? hi + roff : hi;
    const i64 rows = ((i64)b * heads + hq) * t_len;
    lse += rows;
    delta += rows;
    const bf16_t* qh = HEAD(q, b, hq, q_b, q_h);
    const bf16_t* doh = HEAD(dout, b, hq, do_b, do_h);
    const int kmax = min(k0 + TILE, s_len) - 1;
    const int j_r[2] = {k0 + r0 + g, k0 + r0 + g + 8};

    load_tile(sk, HEAD(k, b, kvh, k_b, k_h), k_t, k0, s_len);
    load_tile(sv, HEAD(v, b, kvh, v_b, v_h), v_t, k0, s_len);
    int first, last;
    seen_by(lo, hi, t_len, s_len, k0, kmax, &first, &last);
    first = first / TILE * TILE;
    if (first <= last) load_query_tile(&meta[0], sq, sdo, qh, q_t, doh, do_t, lo, hi, lse, delta, first, t_len, s_len);
    cp_commit();

    const float sl2 = scale * LOG2E;
    float ak[HD / 8][4], av[HD / 8][4];
    zero(ak, HD / 8);
    zero(av, HD / 8);
    for (int q0 = first, buf = 0; q0 <= last; q0 += TILE, buf ^= 1) {
        if (q0 + TILE <= last)
            load_query_tile(&meta[buf ^ 1], sq + (buf ^ 1) * TILE * LD, sdo + (buf ^ 1) * TILE * LD, qh, q_t, doh,
                            do_t, lo, hi, lse, delta, q0 + TILE, t_len, s_len);
        next_stage();
        const QueryTile* m = &meta[buf];
        const bf16_t* qt = sq + buf * TILE * LD;
        const bf16_t* dot = sdo + buf * TILE * LD;
        const int x = threadIdx.x;
        if (x < TILE) meta[buf].lse[x] *= LOG2E; /* this thread's own copy, landed */
        const bool sees = x < TILE && m->lo[x] <= m->hi[x] && m->lo[x] <= kmax && m->hi[x] >= k0;
        if (!__syncthreads_or(sees)) continue; /* a tile inside [first, last] that sees none of these keys */
        /* Every query sees every key of the tile: no mask. */
        const bool full = __syncthreads_and(x >= TILE || (m->lo[x] <= k0 && m->hi[x] >= k0 + TILE - 1));
        float st[TILE / 8][4], dpt[TILE / 8][4];
        zero(st, TILE / 8);
        zero(dpt, TILE / 8);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            u32 ka[4], va[4];
            frag_a(ka, sk, r0, kk, g, t);
            frag_a(va, sv, r0, kk, g, t);
#pragma unroll
            for (int n = 0; n < TILE / 8; n++) {
                u32 b0, b1;
                frag_bt(b0, b1, qt, n * 8, kk, g, t);
                mma(st[n], ka, b0, b1);
                frag_bt(b0, b1, dot, n * 8, kk, g, t);
                mma(dpt[n], va, b0, b1);
            }
        }
        if (full) {
#pragma unroll
            for (int n = 0; n < TILE / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int c = n * 8 + t * 2 + (e & 1);
                    const float p = exp2f(st[n][e] * sl2 - m->lse[c]);
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - m->delta[c]);
                }
        } else {
#pragma unroll
            for (int n = 0; n < TILE / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = j_r[e >> 1], c = n * 8 + t * 2 + (e & 1);
                    const bool seen = j <= kmax && j >= m->lo[c] && j <= m->hi[c];
                    const float p = seen ? exp2f(st[n][e] * sl2 - m->lse[c]) : 0.f;
                    st[n][e] = p;
                    dpt[n][e] = seen ? p * (dpt[n][e] - m->delta[c]) : 0.f;
                }
        }
        accumulate(av, st, dot, g, t);
        accumulate(ak, dpt, qt, g, t);
        __syncthreads();
    }
    cp_wait<0>();
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = j_r[r];
        if (j > kmax) continue;
        float* krow = HEAD(dk, b, hq, dk_b, dk_h) + (i64)j * dk_t;
        float* vrow = HEAD(dv, b, hq, dv_b, dv_h) + (i64)j * dv_t;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            *(float2*)(krow + n * 8 + t * 2) = make_float2(ak[n][2 * r] * scale, ak[n][2 * r + 1] * scale);
            *(float2*)(vrow + n * 8 + t * 2) = make_float2(av[n][2 * r], av[n][2 * r + 1]);
        }
    }
}

__device__ __forceinline__ float bf16_lo(u32 x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_hi(u32 x) { return __uint_as_float(x & 0xffff0000u); }

/* delta = rowsum(dO ∘ O) per query in f32, [B, H, T]: what both backward kernels subtract.
 * Grid (ceil(T / 4), H, B), a warp per query. */
extern "C" __global__ void __launch_bounds__(NT) flash_delta(
    const bf16_t* o, i64 o_b, i64 o_h, i64 o_t,
    const bf16_t* dout, i64 do_b, i64 do_h, i64 do_t,
    float* delta, int heads, int t_len)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * (NT / 32) + warp, h = blockIdx.y, b = blockIdx.z;
    if (i >= t_len) return;
    const bf16_t* orow = HEAD(o, b, h, o_b, o_h) + (i64)i * o_t;
    const bf16_t* drow = HEAD(dout, b, h, do_b, do_h) + (i64)i * do_t;
    float acc = 0.f;
#pragma unroll
    for (int c = lane * 2; c < HD; c += 64) {
        const u32 x = *(const u32*)(orow + c), y = *(const u32*)(drow + c);
        acc += bf16_lo(x) * bf16_lo(y) + bf16_hi(x) * bf16_hi(y);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[((i64)b * heads + h) * t_len + i] = acc;
}

/* out[b, kvh, j, :] = Σ_g part[b, kvh * groups + g, j, :] in bf16: the backward's per-query-head
 * dK or dV partials (f32 [B, H, S, HD], contiguous) summed over each K/V head's group into
 * [B, KV, S, HD], contiguous. Four elements a thread, grid-stride. */
extern "C" __global__ void __launch_bounds__(256) flash_sum_groups(
    const float* part, bf16_t* out, i64 quads, int groups, i64 rows)
{
    /* rows = S * HD / 4: quads of one head */
    for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < quads; x += (i64)gridDim.x * blockDim.x) {
        const i64 bk = x / rows, within = x - bk * rows; /* bk = b * KV + kvh */
        const float4* src = (const float4*)part + (bk * groups) * rows + within;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int gi = 0; gi < groups; gi++) {
            const float4 v = src[(i64)gi * rows];
            acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
        }
        u32* dst = (u32*)(out + x * 4);
        dst[0] = pack2(acc.x, acc.y);
        dst[1] = pack2(acc.z, acc.w);
    }
}

/* Decoding: one query per batch row and head (T = 1), split over keys (FlashDecoding). The
 * forward above gives a query a CTA of 128 query rows and walks all its keys alone: at T = 1
 * that is B x H CTAs, each streaming the whole history, with 127 rows of its MMAs idle.
 *
 * flash_decode: grid (splits, KV heads, B). A CTA takes the `groups` query heads of one K/V
 * head (so each key and value is read once for the whole group) over keys
 * [split * split_len, +split_len) ∩ the row's range, in three passes over shared memory:
 * scores (a thread per key, the group's queries from shared memory), each head's max and
 * exponentials (a warp per head), then P V (a thread per four columns of a stream of keys).
 * It leaves the split's unnormalised output, max and sum (log2 units) in `part` and `ml`;
 * flash_decode_combine rescales the splits into O and lse. P stays f32 (the forward rounds it
 * to bf16 for its MMA).
 *
 * With a page table (paged KV cache), k and v are pools of slots [slots, KV, HD] (k_t the
 * slot stride, k_h the head stride, k_b unused): row b's key at position p sits in slot
 * table[b][(p + shift[b]) / page_len] * page_len + (p + shift[b]) % page_len. */
#define DEC_GMAX 16    /* most query heads per K/V head */
#define DEC_SPLIT 512  /* most keys a CTA takes */
#define DEC_NT 128
#define DEC_COLS 4     /* value columns a thread accumulates in the P V pass */

__device__ __forceinline__ float bf16_to_f32(bf16_t x) { return __uint_as_float((u32)x << 16); }

/* Offset of row b's key or value at position pos from its head's base: strided, or through
 * the page table (see flash_decode). */
__device__ __forceinline__ i64 dec_row(int b, int pos, i64 s_b, i64 s_t, const int* table, int table_ld,
                                       const int* shift, int page_len)
{
    if (!table) return (i64)b * s_b + (i64)pos * s_t;
    const int slot = pos + shift[b];
    return ((i64)table[(i64)b * table_ld + slot / page_len] * page_len + slot % page_len) * s_t;
}

extern "C" __global__ void __launch_bounds__(DEC_NT) flash_decode(
    const bf16_t* q, i64 q_b, i64 q_h,
    const bf16_t* k, i64 k_b, i64 k_h, i64 k_t,
    const bf16_t* v, i64 v_b, i64 v_h, i64 v_t,
    float* part, float* ml, const int* lo, const int* hi, int ranges_per_row,
    int heads, int groups, int s_len, int split_len, float scale,
    const int* table, int table_ld, const int* shift, int page_len)
{
    __shared__ __align__(16) float sq[DEC_GMAX][HD];
    /* Scores, then probabilities [DEC_GMAX][DEC_SPLIT]; then the P V streams' partial sums. */
    __shared__ __align__(16) float sp[DEC_GMAX * DEC_SPLIT];
    __shared__ float smax[DEC_GMAX], ssum[DEC_GMAX];
    const int split = blockIdx.x, splits = gridDim.x, kvh = blockIdx.y, b = blockIdx.z;
    const int h0 = kvh * groups, tid = threadIdx.x;
    const int r = ranges_per_row ? b : 0;
    const int first = max(lo ? lo[r] : 0, split * split_len);
    const int last = min(min(hi ? hi[r] : s_len - 1, s_len - 1), (split + 1) * split_len - 1);
    const int n = last - first + 1; /* keys of this CTA; none when <= 0 */
    const float sl2 = scale * LOG2E;
    for (int i = tid; i < groups * HD; i += DEC_NT) {
        const int g = i / HD, d = i - g * HD;
        sq[g][d] = bf16_to_f32(HEAD(q, b, h0 + g, q_b, q_h)[d]) * sl2;
    }
    __syncthreads();
    const bf16_t* kh = k + (i64)kvh * k_h;
    for (int j = tid; j < n; j += DEC_NT) {
        const bf16_t* row = kh + dec_row(b, first + j, k_b, k_t, table, table_ld, shift, page_len);
        float s[DEC_GMAX];
#pragma unroll
        for (int g = 0; g < DEC_GMAX; g++) s[g] = 0.f;
#pragma unroll 2
        for (int c = 0; c < HD; c += 8) {
            const uint4 raw = *(const uint4*)(row + c);
            const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
            float kf[8];
#pragma unroll
            for (int e = 0; e < 4; e++) { kf[2 * e] = bf16_lo(w[e]); kf[2 * e + 1] = bf16_hi(w[e]); }
#pragma unroll
            for (int g = 0; g < DEC_GMAX; g++) {
                if (g >= groups) break;
                const float4 a = *(const float4*)&sq[g][c], z = *(const float4*)&sq[g][c + 4];
                s[g] += a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3] + z.x * kf[4] + z.y * kf[5] +
                        z.z * kf[6] + z.w * kf[7];
            }
        }
#pragma unroll
        for (int g = 0; g < DEC_GMAX; g++) {
            if (g >= groups) break;
            sp[g * DEC_SPLIT + j] = s[g];
        }
    }
    __syncthreads();
    const int warp = tid >> 5, lane = tid & 31;
    for (int g = warp; g < groups; g += DEC_NT / 32) {
        float* p = sp + g * DEC_SPLIT;
        float mx = NEG_INF;
        for (int j = lane; j < n; j += 32) mx = fmaxf(mx, p[j]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float sum = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float e = exp2f(p[j] - mx);
            p[j] = e;
            sum += e;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) { smax[g] = mx; ssum[g] = sum; }
    }
    __syncthreads();
    /* P V: thread tid owns columns c0 .. c0 + DEC_COLS of the keys j ≡ stream (mod streams). */
    const int quads = HD / DEC_COLS, streams = DEC_NT / quads;
    const int c0 = (tid % quads) * DEC_COLS, stream = tid / quads;
    float acc[DEC_GMAX][DEC_COLS];
#pragma unroll
    for (int g = 0; g < DEC_GMAX; g++)
#pragma unroll
        for (int e = 0; e < DEC_COLS; e++) acc[g][e] = 0.f;
    const bf16_t* vh = v + (i64)kvh * v_h + c0;
    for (int j = stream; j < n; j += streams) {
        const uint2 raw = *(const uint2*)(vh + dec_row(b, first + j, v_b, v_t, table, table_ld, shift, page_len));
        const float vf[4] = {bf16_lo(raw.x), bf16_hi(raw.x), bf16_lo(raw.y), bf16_hi(raw.y)};
#pragma unroll
        for (int g = 0; g < DEC_GMAX; g++) {
            if (g >= groups) break;
            const float p = sp[g * DEC_SPLIT + j];
#pragma unroll
            for (int e = 0; e < DEC_COLS; e++) acc[g][e] += p * vf[e];
        }
    }
    __syncthreads(); /* every stream is done with the probabilities: sp now holds the sums */
#pragma unroll
    for (int g = 0; g < DEC_GMAX; g++) {
        if (g >= groups) break;
        *(float4*)&sp[(stream * DEC_GMAX + g) * HD + c0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    }
    __syncthreads();
    for (int i = tid; i < groups * HD; i += DEC_NT) {
        const int g = i / HD, d = i - g * HD;
        float total = 0.f;
        for (int st = 0; st < streams; st++) total += sp[(st * DEC_GMAX + g) * HD + d];
        const i64 at = ((i64)b * heads + h0 + g) * splits + split;
        part[at * HD + d] = total;
        if (d == 0) { ml[2 * at] = smax[g]; ml[2 * at + 1] = ssum[g]; }
    }
}

/* O = Σ_s part_s 2^(m_s - M) / Σ_s l_s 2^(m_s - M) and lse = (M + log2 L) ln 2 per (head, row),
 * M = max_s m_s, from flash_decode's splits. Grid (H, B); o [B, H, 1, HD] strided. A row
 * that sees no key gets zeros and lse -inf, as from the forward. */
extern "C" __global__ void __launch_bounds__(DEC_NT) flash_decode_combine(
    const float* part, const float* ml, bf16_t* o, i64 o_b, i64 o_h, float* lse, int heads, int splits)
{
    const int h = blockIdx.x, b = blockIdx.y;
    const i64 at = ((i64)b * heads + h) * splits;
    const float* m = ml + 2 * at;
    float mx = NEG_INF;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, m[2 * s]);
    float total = 0.f;
    for (int s = 0; s < splits; s++)
        if (m[2 * s + 1] > 0.f) total += m[2 * s + 1] * exp2f(m[2 * s] - mx);
    const float inv = total > 0.f ? 1.f / total : 0.f;
    bf16_t* orow = HEAD(o, b, h, o_b, o_h);
    for (int d = threadIdx.x; d < HD; d += DEC_NT) {
        float acc = 0.f;
        for (int s = 0; s < splits; s++)
            if (m[2 * s + 1] > 0.f) acc += part[(at + s) * HD + d] * exp2f(m[2 * s] - mx);
        orow[d] = (bf16_t)(pack2(acc * inv, 0.f) & 0xffffu);
    }
    if (threadIdx.x == 0) lse[(i64)b * heads + h] = total > 0.f ? (mx + log2f(total)) * LN2 : NEG_INF;
}
