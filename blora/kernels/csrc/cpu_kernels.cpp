// CPU kernels of the engine's decode step: batched multi-LoRA for few tokens per adapter, and paged decode
// attention (see the comment above run_attention).
//
// Batched multi-LoRA:
// For every adapter u of a module and every token t routed to it:  y[t] += (x[t] @ A_u) @ B_u
// with A_u given transposed (At_u [r_u, in], PEFT's lora_A layout) and B_u [r_u, out], both row-major
// (scaling folded into B), accumulated in float32 and added to y once (one rounding for bfloat16). Each adapter's weights are streamed from memory once per
// call whatever its token count, which is what decode needs: it is bound by reading adapter weights, and
// a GEMM library call per adapter costs more in overhead than the work itself. Adapters own disjoint
// tokens, so threads split the adapters without write conflicts. The AVX-512 path computes h for all of an
// adapter's tokens, then the expand in register tiles of B's columns (see tiled()): for decode's 1-4 tokens
// that streams B at memory speed, and for prefill (the engine's fused path, dozens of tokens, compute-bound)
// each slice of B is reused from L1; with AVX512-BF16 the bfloat16 shrink multiplies bf16 pairs directly
// (_mm512_dpbf16_ps).
//
// Built on first use by blora/kernels/__init__.py (g++ -O3 -march=native -fopenmp) and called via ctypes.
// An AVX-512 path (x86 with AVX512F/BW) and a portable path the compiler vectorizes (-DBLORA_GENERIC
// forces it; tests check both against the reference op).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_f32(uint16_t v) {
    uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

constexpr int64_t kBlock = 4;  // tokens per pass over an adapter's weights (bounds scratch and registers)

// Portable path, one block of m <= kBlock tokens rows[0..m): At [r, in], B [r, out]. h [m, r], acc [m, out],
// xf [m, in] and af [in] are per-thread scratch.
template <typename T>
void block_generic(const T* x, int64_t xs, T* y, int64_t ys, int64_t in, int64_t out, const int64_t* rows,
                   int64_t m, const T* at, const T* b, int64_t r, float* h, float* acc, float* xf, float* af) {
    // shrink: h[t, k] = x[t, :] . At[k, :], streaming At's rows once for all m tokens
    for (int64_t t = 0; t < m; ++t) {
        const T* xr = x + rows[t] * xs;
        float* xt = xf + t * in;
        for (int64_t i = 0; i < in; ++i) xt[i] = load(xr, i);
    }
    for (int64_t k = 0; k < r; ++k) {
        const T* arow = at + k * in;
        for (int64_t i = 0; i < in; ++i) af[i] = load(arow, i);
        for (int64_t t = 0; t < m; ++t) {
            const float* xt = xf + t * in;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < in; ++i) s += xt[i] * af[i];
            h[t * r + k] = s;
        }
    }
    // expand: acc[t, :] = h[t, :] @ B, streaming B's rows once; then y[t] += acc[t]
    std::memset(acc, 0, sizeof(float) * m * out);
    for (int64_t k = 0; k < r; ++k) {
        const T* brow = b + k * out;
        for (int64_t j0 = 0; j0 < out; j0 += 1024) {
            const int64_t jn = (out - j0) < 1024 ? (out - j0) : 1024;
            float bf[1024];
            for (int64_t j = 0; j < jn; ++j) bf[j] = load(brow, j0 + j);
            for (int64_t t = 0; t < m; ++t) {
                const float hv = h[t * r + k];
                float* at = acc + t * out + j0;
                for (int64_t j = 0; j < jn; ++j) at[j] += hv * bf[j];
            }
        }
    }
    for (int64_t t = 0; t < m; ++t) {
        T* yr = y + rows[t] * ys;
        const float* at = acc + t * out;
        for (int64_t j = 0; j < out; ++j) store(yr, j, load(yr, j) + at[j]);
    }
}


template <typename T>
void one_adapter_generic(const T* x, int64_t xs, T* y, int64_t ys, int64_t in, int64_t out, const int64_t* rows,
                         int64_t m, const T* at, const T* b, int64_t r, float* h, float* acc, float* xf,
                         float* af) {
    for (int64_t t = 0; t < m; t += kBlock)
        block_generic<T>(x, xs, y, ys, in, out, rows + t, m - t < kBlock ? m - t : kBlock, at, b, r, h, acc, xf, af);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(BLORA_GENERIC)
// AVX-512: up to 4 tokens at a time, accumulators in registers, weights converted while streamed.
// Masked loads/stores only for a row's tail: on AMD Zen 4 they are much slower than plain ones.
inline __m512 load16(const float* p, __mmask16 k) {
    return k == 0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
}
inline __m512 load16(const uint16_t* p, __mmask16 k) {
    __m256i v = k == 0xffff ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline void store16(float* p, __m512 v, __mmask16 k) {
    if (k == 0xffff)
        _mm512_storeu_ps(p, v);
    else
        _mm512_mask_storeu_ps(p, k, v);
}
inline void store16(uint16_t* p, __m512 v, __mmask16 k) {
#if defined(__AVX512BF16__)
    __m256i r = (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    __m256i r = _mm512_cvtepi32_epi16(rounded);
#endif
    if (k == 0xffff)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
    else
        _mm256_mask_storeu_epi16(p, k, r);
}
constexpr int kAhead = 4096;  // bytes of a weight stream prefetched ahead of use (measured: 2048-4096 best)
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1); }

// shrink: h[t, k] = x[t] . At[k] for MT tokens, two rows of At per pass over x (x stays in L1).
template <typename T, int MT>
void shrink_avx512(const T* const* xr, const T* at, int64_t in, int64_t r, float* h) {
    int64_t k = 0;
    for (; k + 2 <= r; k += 2) {
        const T* a0 = at + k * in;
        const T* a1 = a0 + in;
        __m512 s0[MT], s1[MT];
        for (int t = 0; t < MT; ++t) s0[t] = s1[t] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i += 16) {
            const __mmask16 km = tail_mask(in - i);
            _mm_prefetch(reinterpret_cast<const char*>(a0 + i) + kAhead, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(a1 + i) + kAhead, _MM_HINT_T0);
            const __m512 v0 = load16(a0 + i, km), v1 = load16(a1 + i, km);
            for (int t = 0; t < MT; ++t) {
                const __m512 xv = load16(xr[t] + i, km);
                s0[t] = _mm512_fmadd_ps(xv, v0, s0[t]);
                s1[t] = _mm512_fmadd_ps(xv, v1, s1[t]);
            }
        }
        for (int t = 0; t < MT; ++t) {
            h[t * r + k] = _mm512_reduce_add_ps(s0[t]);
            h[t * r + k + 1] = _mm512_reduce_add_ps(s1[t]);
        }
    }
    if (k < r) {
        const T* a0 = at + k * in;
        __m512 s0[MT];
        for (int t = 0; t < MT; ++t) s0[t] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i += 16) {
            const __mmask16 km = tail_mask(in - i);
            const __m512 v0 = load16(a0 + i, km);
            for (int t = 0; t < MT; ++t) s0[t] = _mm512_fmadd_ps(load16(xr[t] + i, km), v0, s0[t]);
        }
        for (int t = 0; t < MT; ++t) h[t * r + k] = _mm512_reduce_add_ps(s0[t]);
    }
}

#if defined(__AVX512BF16__)
// bfloat16 shrink with _mm512_dpbf16_ps: 32 products per instruction straight from the bf16 rows, no
// conversion of x or At (the product of two bf16 values is exact in float32; the sums stay float32). It
// quadruples the shrink's arithmetic rate, which prefill (dozens of tokens per adapter) is bound by.
inline __mmask32 tail_mask32(int64_t left) { return left >= 32 ? 0xffffffffu : static_cast<__mmask32>((1u << left) - 1); }
inline __m512bh load32bh(const uint16_t* p, __mmask32 k) {
    return (__m512bh)(k == 0xffffffffu ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(k, p));
}

template <int MT>
void shrink_bf16(const uint16_t* const* xr, const uint16_t* at, int64_t in, int64_t r, float* h) {
    int64_t k = 0;
    for (; k + 2 <= r; k += 2) {
        const uint16_t* a0 = at + k * in;
        const uint16_t* a1 = a0 + in;
        __m512 s0[MT], s1[MT];
        for (int t = 0; t < MT; ++t) s0[t] = s1[t] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i += 32) {
            const __mmask32 km = tail_mask32(in - i);
            _mm_prefetch(reinterpret_cast<const char*>(a0 + i) + kAhead, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(a1 + i) + kAhead, _MM_HINT_T0);
            const __m512bh v0 = load32bh(a0 + i, km), v1 = load32bh(a1 + i, km);
            for (int t = 0; t < MT; ++t) {
                const __m512bh xv = load32bh(xr[t] + i, km);
                s0[t] = _mm512_dpbf16_ps(s0[t], xv, v0);
                s1[t] = _mm512_dpbf16_ps(s1[t], xv, v1);
            }
        }
        for (int t = 0; t < MT; ++t) {
            h[t * r + k] = _mm512_reduce_add_ps(s0[t]);
            h[t * r + k + 1] = _mm512_reduce_add_ps(s1[t]);
        }
    }
    if (k < r) {
        const uint16_t* a0 = at + k * in;
        __m512 s0[MT];
        for (int t = 0; t < MT; ++t) s0[t] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i += 32) {
            const __mmask32 km = tail_mask32(in - i);
            const __m512bh v0 = load32bh(a0 + i, km);
            for (int t = 0; t < MT; ++t) s0[t] = _mm512_dpbf16_ps(s0[t], load32bh(xr[t] + i, km), v0);
        }
        for (int t = 0; t < MT; ++t) h[t * r + k] = _mm512_reduce_add_ps(s0[t]);
    }
}
#endif

template <typename T, int MT>
inline void shrink(const T* const* xr, const T* at, int64_t in, int64_t r, float* h) {
#if defined(__AVX512BF16__)
    if constexpr (sizeof(T) == 2) {
        shrink_bf16<MT>(xr, at, in, r, h);
        return;
    }
#endif
    shrink_avx512<T, MT>(xr, at, in, r, h);
}

// The expand of one tile of kTileCols output columns for MT tokens, accumulators in registers over the
// whole rank and added to y once. Token blocks walk one column tile after another, so the tile's slice of B
// (r x kTileCols) comes from memory once and from L1 for every further block; the first block prefetches
// each row's slice of a tile 4 tiles ahead (every row of B is its own stream). For decode (one block of
// 1-4 tokens per adapter) this streams B 15-18% faster than passing over B's rows with the accumulators in
// memory (16 adapters of rank 16 on Qwen2.5-0.5B's projections, 2 threads: 10.0 vs 11.9 ms per 24 layers,
// bit-identical results): that order's accumulator loads and stores, ~40 KB per token on a gate/up row,
// fall out of L1.
constexpr int kTileVecs = 4;
constexpr int64_t kTileCols = 16 * kTileVecs;

template <typename T, int MT>
void expand_tile(const T* b, int64_t r, int64_t out, int64_t j0, const float* h, T* const* yr, bool ahead) {
    __m512 acc[MT][kTileVecs];
    __mmask16 km[kTileVecs];
    for (int v = 0; v < kTileVecs; ++v) {
        const int64_t left = out - j0 - 16 * v;
        km[v] = left > 0 ? tail_mask(left) : 0;
        for (int t = 0; t < MT; ++t) acc[t][v] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < r; ++k) {
        const T* brow = b + k * out + j0;
        if (ahead)  // the first token block: fetch this row's slice of a later tile
            for (int v = 0; v < kTileVecs; ++v)
                _mm_prefetch(reinterpret_cast<const char*>(brow + 16 * v + 4 * kTileCols), _MM_HINT_T0);
        __m512 bv[kTileVecs];
        for (int v = 0; v < kTileVecs; ++v) bv[v] = load16(brow + 16 * v, km[v]);
        for (int t = 0; t < MT; ++t) {
            const __m512 hv = _mm512_set1_ps(h[t * r + k]);
            for (int v = 0; v < kTileVecs; ++v) acc[t][v] = _mm512_fmadd_ps(hv, bv[v], acc[t][v]);
        }
    }
    for (int t = 0; t < MT; ++t)
        for (int v = 0; v < kTileVecs; ++v)
            if (km[v]) store16(yr[t] + j0 + 16 * v, _mm512_add_ps(load16(yr[t] + j0 + 16 * v, km[v]), acc[t][v]), km[v]);
}

template <typename T>
void tiled(const T* x, int64_t xs, T* y, int64_t ys, int64_t in, int64_t out, const int64_t* rows, int64_t m,
           const T* at, const T* b, int64_t r, float* h) {
    for (int64_t t0 = 0; t0 < m; t0 += kBlock) {  // shrink: h [m, r]
        const T* xr[kBlock];
        const int64_t mt = m - t0 < kBlock ? m - t0 : kBlock;
        for (int64_t t = 0; t < mt; ++t) xr[t] = x + rows[t0 + t] * xs;
        switch (mt) {
            case 4: shrink<T, 4>(xr, at, in, r, h + t0 * r); break;
            case 3: shrink<T, 3>(xr, at, in, r, h + t0 * r); break;
            case 2: shrink<T, 2>(xr, at, in, r, h + t0 * r); break;
            default: shrink<T, 1>(xr, at, in, r, h + t0 * r); break;
        }
    }
    for (int64_t j0 = 0; j0 < out; j0 += kTileCols) {
        for (int64_t t0 = 0; t0 < m; t0 += kBlock) {
            T* yr[kBlock];
            const int64_t mt = m - t0 < kBlock ? m - t0 : kBlock;
            for (int64_t t = 0; t < mt; ++t) yr[t] = y + rows[t0 + t] * ys;
            const float* ht = h + t0 * r;
            switch (mt) {
                case 4: expand_tile<T, 4>(b, r, out, j0, ht, yr, t0 == 0); break;
                case 3: expand_tile<T, 3>(b, r, out, j0, ht, yr, t0 == 0); break;
                case 2: expand_tile<T, 2>(b, r, out, j0, ht, yr, t0 == 0); break;
                default: expand_tile<T, 1>(b, r, out, j0, ht, yr, t0 == 0); break;
            }
        }
    }
}

// h: scratch of at least max(kBlock, m) * r floats.
template <typename T>
void one_adapter(const T* x, int64_t xs, T* y, int64_t ys, int64_t in, int64_t out, const int64_t* rows,
                 int64_t m, const T* at, const T* b, int64_t r, float* h, float*, float*, float*) {
    tiled<T>(x, xs, y, ys, in, out, rows, m, at, b, r, h);
}
#else
template <typename T>
void one_adapter(const T* x, int64_t xs, T* y, int64_t ys, int64_t in, int64_t out, const int64_t* rows,
                 int64_t m, const T* at, const T* b, int64_t r, float* h, float* acc, float* xf, float* af) {
    one_adapter_generic<T>(x, xs, y, ys, in, out, rows, m, at, b, r, h, acc, xf, af);
}
#endif

// adapters[u] = {A pointer, B pointer, rank, position into offsets, first output column, output width}:
// y[t, col:col+width] += x[t] @ A_u @ B_u for the tokens rows[offsets[pos] .. offsets[pos + 1]). Several
// projections sharing x (a fused q/k/v output) can be one call. Entries are taken largest first (the
// caller orders them), so the two threads finish together.
constexpr int64_t kMetaCols = 6;

template <typename T>
void run(const T* x, int64_t xs, T* y, int64_t ys, int64_t in, int64_t n, const int64_t* adapters,
         const int64_t* offsets, const int64_t* rows, int64_t threads) {
    int64_t max_r = 0, max_out = 0, max_h = 0;
    for (int64_t u = 0; u < n; ++u) {
        const int64_t* e = adapters + kMetaCols * u;
        const int64_t m = offsets[e[3] + 1] - offsets[e[3]];
        max_r = e[2] > max_r ? e[2] : max_r;
        max_out = e[5] > max_out ? e[5] : max_out;
        max_h = (m > kBlock ? m : kBlock) * e[2] > max_h ? (m > kBlock ? m : kBlock) * e[2] : max_h;
    }
    if (threads < 1) threads = 1;
    if (threads > n) threads = n;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> h(max_h), acc(kBlock * ((max_out + 15) / 16) * 16), xf(kBlock * in), af(in);
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < n; ++u) {
            const int64_t* e = adapters + kMetaCols * u;
            const int64_t pos = e[3];
            const int64_t m = offsets[pos + 1] - offsets[pos];
            if (m == 0) continue;
            one_adapter<T>(x, xs, y + e[4], ys, in, e[5], rows + offsets[pos], m, reinterpret_cast<const T*>(e[0]),
                           reinterpret_cast<const T*>(e[1]), e[2], h.data(), acc.data(), xf.data(), af.data());
        }
    }
}


// ---- paged decode attention -----------------------------------------------------------------------------
//
// One query token per sequence b, attending over its cached tokens [start, len) (start > 0 only with a
// sliding window). The cache is head-major: K/V [KVH, slots, D] row-major, so a token's key for K/V head g
// is the D values at (g * slots + slot) * D. For each (b, g): the n_rep = H / KVH query heads sharing head
// g (GQA) are done together, so each cached key/value row is read once for all of them:
//   scores[h, p] = scale * q[h] . K[slot(p)],  w = softmax over p (float32),  out[h] = sum_p w[h, p] V[slot(p)]
// Everything is accumulated in float32 and rounded once into out [B, H, D]. Tasks (b, g) are split over
// threads; they write disjoint outputs.

struct AttnArgs {
    const void* q;              // query rows: element (b, h, d) at q[qrow(b) * q_stride_n + h * q_stride_h + d]
    int64_t q_stride_n, q_stride_h;
    const int64_t* q_rows;      // [B] row of each decode query in the flat batch, or null: row b
    const void* k_cache;        // [KVH, cache_slots, D]
    const void* v_cache;
    int64_t cache_slots;
    const int64_t* slots;       // [B, slots_stride]: cache slot of each position of sequence b
    int64_t slots_stride;
    const int64_t* lens;        // [B] context length (positions 0..len-1 are cached, including this token)
    int64_t window;             // > 0: attend only to the last `window` positions
    float scale;
    void* out;                  // [B, H, D] contiguous
    int64_t B, H, KVH, D;
};

template <typename T>
void attend_generic(const AttnArgs& a, int64_t b, int64_t g, float* qf, float* scores) {
    const int64_t rep = a.H / a.KVH, D = a.D, len = a.lens[b];
    const int64_t start = (a.window > 0 && len > a.window) ? len - a.window : 0, n = len - start;
    const T* q = static_cast<const T*>(a.q) + (a.q_rows ? a.q_rows[b] : b) * a.q_stride_n;
    const T* kc = static_cast<const T*>(a.k_cache) + g * a.cache_slots * D;
    const T* vc = static_cast<const T*>(a.v_cache) + g * a.cache_slots * D;
    const int64_t* sl = a.slots + b * a.slots_stride + start;
    for (int64_t j = 0; j < rep; ++j)
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = load(q + (g * rep + j) * a.q_stride_h, d) * a.scale;
    for (int64_t p = 0; p < n; ++p) {
        const T* kr = kc + sl[p] * D;
        for (int64_t j = 0; j < rep; ++j) {
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += qf[j * D + d] * load(kr, d);
            scores[j * n + p] = s;
        }
    }
    T* out = static_cast<T*>(a.out) + (b * a.H + g * rep) * D;
    for (int64_t j = 0; j < rep; ++j) {
        float* sc = scores + j * n;
        float m = sc[0];
        for (int64_t p = 1; p < n; ++p) m = sc[p] > m ? sc[p] : m;
        float sum = 0.f;
        for (int64_t p = 0; p < n; ++p) {
            sc[p] = std::exp(sc[p] - m);
            sum += sc[p];
        }
        float* acc = qf + j * D;  // q of head j is no longer needed
        for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
        for (int64_t p = 0; p < n; ++p) {
            const T* vr = vc + sl[p] * D;
            const float w = sc[p];
            for (int64_t d = 0; d < D; ++d) acc[d] += w * load(vr, d);
        }
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < D; ++d) store(out + j * D, d, acc[d] * inv);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(BLORA_GENERIC)
// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * e^f with n = round(x / ln 2) and a degree-6
// polynomial for e^f on |f| <= ln(2) / 2 (Cephes expf coefficients, ~1 ulp); inputs below -87 give ~0.
inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

// G query heads (of one K/V head) at a time: G accumulators stay in registers while a key or value row is
// converted once. qf: the G heads' scaled queries [G, Dp] (Dp = D rounded up to 16, zero padded).
template <typename T, int G>
void attend_heads(const T* kc, const T* vc, const int64_t* sl, int64_t n, int64_t D, const float* qf,
                  float* scores, T* out) {
    const int64_t Dp = (D + 15) / 16 * 16;
    constexpr int64_t kAheadRows = 8;  // software prefetch distance, in cached positions
    for (int64_t p = 0; p < n; ++p) {  // scores[j, p] = q_j . K[p]
        const T* kr = kc + sl[p] * D;
        if (p + kAheadRows < n) {  // rows are scattered by blocks: help the hardware prefetcher
            const char* ahead = reinterpret_cast<const char*>(kc + sl[p + kAheadRows] * D);
            for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
            const char* vahead = reinterpret_cast<const char*>(vc + sl[p + kAheadRows] * D);
            for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(vahead + b, _MM_HINT_T0);
        }
        __m512 s[G];
        for (int j = 0; j < G; ++j) s[j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 k = load16(kr + d, tail_mask(D - d));
            for (int j = 0; j < G; ++j) s[j] = _mm512_fmadd_ps(k, _mm512_loadu_ps(qf + j * Dp + d), s[j]);
        }
        for (int j = 0; j < G; ++j) scores[j * n + p] = _mm512_reduce_add_ps(s[j]);
    }
    float inv[G];
    for (int j = 0; j < G; ++j) {  // softmax numerators in place; 1 / sum applied to the output
        float* sc = scores + j * n;
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (int64_t p = 0; p < n; p += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask(n - p), sc + p));
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t p = 0; p < n; p += 16) {
            const __mmask16 km = tail_mask(n - p);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(km, sc + p), mx));
            _mm512_mask_storeu_ps(sc + p, km, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(km, e));
        }
        inv[j] = 1.f / _mm512_reduce_add_ps(sum);
    }
    for (int64_t d = 0; d < D; d += 16) {  // out[j, d:d+16] = sum_p w[j, p] V[p, d:d+16]
        const __mmask16 km = tail_mask(D - d);
        __m512 acc[G];
        for (int j = 0; j < G; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t p = 0; p < n; ++p) {
            const __m512 v = load16(vc + sl[p] * D + d, km);
            for (int j = 0; j < G; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(scores[j * n + p]), v, acc[j]);
        }
        for (int j = 0; j < G; ++j) store16(out + j * D + d, _mm512_mul_ps(acc[j], _mm512_set1_ps(inv[j])), km);
    }
}

template <typename T>
void attend(const AttnArgs& a, int64_t b, int64_t g, float* qf, float* scores) {
    const int64_t rep = a.H / a.KVH, D = a.D, Dp = (D + 15) / 16 * 16, len = a.lens[b];
    const int64_t start = (a.window > 0 && len > a.window) ? len - a.window : 0, n = len - start;
    const T* q = static_cast<const T*>(a.q) + (a.q_rows ? a.q_rows[b] : b) * a.q_stride_n;
    const T* kc = static_cast<const T*>(a.k_cache) + g * a.cache_slots * D;
    const T* vc = static_cast<const T*>(a.v_cache) + g * a.cache_slots * D;
    const int64_t* sl = a.slots + b * a.slots_stride + start;
    T* out = static_cast<T*>(a.out) + (b * a.H + g * rep) * D;
    for (int64_t j0 = 0; j0 < rep; j0 += 4) {
        const int64_t G = rep - j0 < 4 ? rep - j0 : 4;
        for (int64_t j = 0; j < G; ++j) {
            const T* qr = q + (g * rep + j0 + j) * a.q_stride_h;
            for (int64_t d = 0; d < Dp; ++d) qf[j * Dp + d] = d < D ? load(qr, d) * a.scale : 0.f;
        }
        T* o = out + j0 * D;
        switch (G) {
            case 4: attend_heads<T, 4>(kc, vc, sl, n, D, qf, scores, o); break;
            case 3: attend_heads<T, 3>(kc, vc, sl, n, D, qf, scores, o); break;
            case 2: attend_heads<T, 2>(kc, vc, sl, n, D, qf, scores, o); break;
            default: attend_heads<T, 1>(kc, vc, sl, n, D, qf, scores, o); break;
        }
    }
}
#else
template <typename T>
void attend(const AttnArgs& a, int64_t b, int64_t g, float* qf, float* scores) {
    attend_generic<T>(a, b, g, qf, scores);
}
#endif

template <typename T>
void run_attention(const AttnArgs& a, int64_t threads) {
    const int64_t tasks = a.B * a.KVH, rep = a.H / a.KVH, Dp = (a.D + 15) / 16 * 16;
    int64_t max_len = 0;
    for (int64_t b = 0; b < a.B; ++b) max_len = a.lens[b] > max_len ? a.lens[b] : max_len;
    if (threads < 1) threads = 1;
    if (threads > tasks) threads = tasks;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> qf(rep * Dp), scores(rep * (max_len + 16));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) attend<T>(a, t / a.KVH, t % a.KVH, qf.data(), scores.data());
    }
}


// ---- elementwise ops of the Llama-family decoder (blora/engine/fast_path.py) ------------------------------
//
// Each reproduces the rounding of the PyTorch ops it replaces: every intermediate that PyTorch materializes
// in the model dtype is rounded to it here too (a no-op for float32), and no multiply-add is fused
// (-ffp-contract=off), so results match transformers' modules up to the order of a float32 sum.

inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) { return bf16_to_f32(f32_to_bf16(v)); }

// RMSNorm over rows of `hid` values, optionally after the residual add:
//   res (if given): res = round(res + x), then out = round(w * round(res * rsqrt(mean(res^2) + eps)))
//   otherwise:      out = round(w * round(x * rsqrt(mean(x^2) + eps)))
// Rows have strides xs, rs, os (elements); weight w [hid].
template <typename T>
void rms_norm(const T* x, int64_t xs, T* res, int64_t rs, const T* w, T* out, int64_t os, int64_t n, int64_t hid,
              float eps, int64_t threads) {
#pragma omp parallel for num_threads(threads) if (n * hid >= 65536)
    for (int64_t i = 0; i < n; ++i) {
        const T* src = x + i * xs;
        if (res) {
            T* r = res + i * rs;
            for (int64_t d = 0; d < hid; ++d) store(r, d, load(r, d) + load(src, d));
            src = r;
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t d = 0; d < hid; ++d) {
            const float v = load(src, d);
            ss += v * v;
        }
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(hid) + eps);
        T* o = out + i * os;
        for (int64_t d = 0; d < hid; ++d) store(o, d, load(w, d) * round_to(load(src, d) * inv, w));
    }
}

// Rotary embedding in place on `heads` heads of D values per row (queries and keys of a fused qkv row):
//   x = round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) = [-x[D/2:], x[:D/2]]
// Head h of row i at x + i * xs + h * D; cos/sin [n, D] rows with stride cs.
template <typename T>
void rotary(T* x, int64_t xs, int64_t heads, int64_t D, const T* cos, const T* sin, int64_t cs, int64_t n,
            int64_t threads) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(threads) if (n * heads * D >= 65536)
    for (int64_t i = 0; i < n; ++i) {
        const T* c = cos + i * cs;
        const T* s = sin + i * cs;
        float tmp[1024];
        for (int64_t h = 0; h < heads; ++h) {
            T* v = x + i * xs + h * D;
            for (int64_t d = 0; d < D; ++d) tmp[d] = load(v, d);
            for (int64_t d = 0; d < D; ++d) {
                const float rot = d < half ? -tmp[d + half] : tmp[d - half];
                const float a = round_to(tmp[d] * load(c, d), v), b = round_to(rot * load(s, d), v);
                store(v, d, a + b);
            }
        }
    }
}

// out = round(round(silu(g)) * u) with g = gu[:, :inter], u = gu[:, inter:] (a fused gate/up projection).
template <typename T>
void silu_mul(const T* gu, int64_t gs, T* out, int64_t os, int64_t n, int64_t inter, int64_t threads) {
#pragma omp parallel for num_threads(threads) if (n * inter >= 65536)
    for (int64_t i = 0; i < n; ++i) {
        const T* g = gu + i * gs;
        const T* u = g + inter;
        T* o = out + i * os;
        int64_t d = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(BLORA_GENERIC)
        for (; d + 16 <= inter; d += 16) {
            const __m512 gv = load16(g + d, 0xffff);
            const __m512 sig = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            __m512 a = sig;
            if (sizeof(T) == 2) {  // round silu(g) to bfloat16 as torch's silu output is
                __m512i bits = _mm512_castps_si512(sig);
                __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
                bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
                a = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
            }
            store16(o + d, _mm512_mul_ps(a, load16(u + d, 0xffff)), 0xffff);
        }
#endif
        for (; d < inter; ++d) {
            const float gv = load(g, d);
            store(o, d, round_to(gv / (1.f + std::exp(-gv)), o) * load(u, d));
        }
    }
}


// Paged KV cache write: cache[g, slots[i], :] = src[i, g, :] for keys and values at once. src element
// (i, g, d) at src + i * row_stride + g * head_stride + d; caches [KVH, cache_slots, D] contiguous.
template <typename T>
void store_kv(const T* k, const T* v, int64_t row_stride, int64_t head_stride, T* k_cache, T* v_cache,
              int64_t cache_slots, const int64_t* slots, int64_t n, int64_t kvh, int64_t D) {
    for (int64_t i = 0; i < n; ++i)
        for (int64_t g = 0; g < kvh; ++g) {
            const int64_t src = i * row_stride + g * head_stride, dst = (g * cache_slots + slots[i]) * D;
            std::memcpy(k_cache + dst, k + src, sizeof(T) * D);
            std::memcpy(v_cache + dst, v + src, sizeof(T) * D);
        }
}


// Greedy pick: out[i] = index of the first maximum of row i of x [n, v] (row stride xs); a row holding NaN
// gives its first NaN, as torch.argmax does.
template <typename T>
int64_t argmax_row_generic(const T* r, int64_t v) {
    int64_t at = 0;
    float best = load(r, 0);
    for (int64_t j = 0; j < v; ++j) {
        const float f = load(r, j);
        if (f != f) return j;
        if (f > best) {
            best = f;
            at = j;
        }
    }
    return at;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(BLORA_GENERIC)
// One pass: per lane the first maximum and its index (strict >), then the smallest index among the lanes
// holding the row maximum. NaN anywhere: the portable scan finds the first one.
template <typename T>
int64_t argmax_row(const T* r, int64_t v) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i idx = _mm512_setzero_si512();
    __m512i cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    if (v >= (int64_t(1) << 31)) return argmax_row_generic(r, v);
    for (int64_t j = 0; j < v; j += 16) {
        const __mmask16 km = tail_mask(v - j);
        const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), km, load16(r + j, km));
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        const __mmask16 gt = _mm512_cmp_ps_mask(x, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, gt, x);
        idx = _mm512_mask_mov_epi32(idx, gt, cur);
        cur = _mm512_add_epi32(cur, step);
    }
    if (nan) return argmax_row_generic(r, v);
    const float m = _mm512_reduce_max_ps(best);
    const __mmask16 at = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
    const int32_t first = _mm512_mask_reduce_min_epi32(at, idx);
    return m == -INFINITY ? 0 : first;
}
#else
template <typename T>
int64_t argmax_row(const T* r, int64_t v) {
    return argmax_row_generic(r, v);
}
#endif

template <typename T>
void argmax_rows(const T* x, int64_t xs, int64_t n, int64_t v, int64_t* out, int64_t threads) {
#pragma omp parallel for num_threads(threads) if (n * v >= 65536)
    for (int64_t i = 0; i < n; ++i) out[i] = argmax_row(x + i * xs, v);
}


// int8 weight-only linear (blora.models.quant): y[m, n] = round(scale[n] * sum_k x[m, k] * q[n, k]) with x
// bfloat16 [M, K] (row stride xs), q int8 in blocks of 16 output rows, qb [N/16][K][16] (the 16 rows of a
// block side by side for each input column), scale bfloat16 [N], y bfloat16 [M, N] (row stride ys). Each
// product of a bfloat16 and an int8 value is exact in float32, the sums are float32, the scale multiplies
// the sum once. The blocked layout streams the weights in order and gives 16 outputs per vector without a
// horizontal sum: measured at Qwen2.5-0.5B's decode shapes (2 threads, weights from memory), one row
// 1.2-1.7x faster than torch._weight_int8pack_mm over [N, K] rows, and faster at every batch size up to 512
// rows (it converts each weight to float once per 4 rows). xf: scratch of M * K floats.
constexpr int64_t kQBlock = 16;

template <int MT>
void int8_block_generic(const float* xf, int64_t K, const int8_t* w, const uint16_t* sc, uint16_t* y, int64_t ys) {
    for (int m = 0; m < MT; ++m) {
        float acc[kQBlock] = {};
        const float* xm = xf + m * K;
        for (int64_t k = 0; k < K; ++k) {
            const float xv = xm[k];
            const int8_t* wk = w + k * kQBlock;
            for (int64_t j = 0; j < kQBlock; ++j) acc[j] += xv * static_cast<float>(wk[j]);
        }
        for (int64_t j = 0; j < kQBlock; ++j) y[m * ys + j] = f32_to_bf16(acc[j] * bf16_to_f32(sc[j]));
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(BLORA_GENERIC)
constexpr int kQAhead = 8192;  // bytes of the weight stream prefetched ahead (measured: 8192-16384 best)

template <int MT>
void int8_block(const float* xf, int64_t K, const int8_t* w, const uint16_t* sc, uint16_t* y, int64_t ys) {
    __m512 acc[MT][4];  // four partial sums per row: independent multiply-adds in flight
    for (int m = 0; m < MT; ++m)
        for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        _mm_prefetch(reinterpret_cast<const char*>(w + k * kQBlock) + kQAhead, _MM_HINT_T0);
        for (int u = 0; u < 4; ++u) {
            const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (k + u) * kQBlock));
            const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
            for (int m = 0; m < MT; ++m) acc[m][u] = _mm512_fmadd_ps(_mm512_set1_ps(xf[m * K + k + u]), wv, acc[m][u]);
        }
    }
    for (; k < K; ++k) {
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * kQBlock))));
        for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_fmadd_ps(_mm512_set1_ps(xf[m * K + k]), wv, acc[m][0]);
    }
    const __m512 scale = load16(sc, 0xffff);
    for (int m = 0; m < MT; ++m) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
        store16(y + m * ys, _mm512_mul_ps(sum, scale), 0xffff);
    }
}
#else
template <int MT>
void int8_block(const float* xf, int64_t K, const int8_t* w, const uint16_t* sc, uint16_t* y, int64_t ys) {
    int8_block_generic<MT>(xf, K, w, sc, y, ys);
}
#endif

void int8_linear(const uint16_t* x, int64_t xs, int64_t M, int64_t K, const int8_t* qb, const uint16_t* sc,
                 int64_t N, uint16_t* y, int64_t ys, float* xf, int64_t threads) {
    const int64_t blocks = N / kQBlock;
#pragma omp parallel num_threads(threads) if (M * N * K >= 65536)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k) xf[m * K + k] = bf16_to_f32(x[m * xs + k]);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int8_t* w = qb + b * K * kQBlock;
            for (int64_t t = 0; t < M; t += 4) {  // 4 rows per pass over the block (from L1/L2 after the first)
                const float* xt = xf + t * K;
                uint16_t* yt = y + t * ys + b * kQBlock;
                switch (M - t < 4 ? M - t : 4) {
                    case 1: int8_block<1>(xt, K, w, sc + b * kQBlock, yt, ys); break;
                    case 2: int8_block<2>(xt, K, w, sc + b * kQBlock, yt, ys); break;
                    case 3: int8_block<3>(xt, K, w, sc + b * kQBlock, yt, ys); break;
                    default: int8_block<4>(xt, K, w, sc + b * kQBlock, yt, ys); break;
                }
            }
        }
    }
}

// The blocked int8 weight dequantized to bfloat16 rows, out [N, K] = round(q * scale) (exactly
// QuantizedLinear.dequantize): for batches large enough that oneDNN's bfloat16 GEMM over it beats the
// int8 kernel, which converts every weight once per 4 rows.
void int8_dequantize(const int8_t* qb, const uint16_t* sc, int64_t N, int64_t K, uint16_t* out, int64_t threads) {
    const int64_t blocks = N / kQBlock;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int8_t* w = qb + b * K * kQBlock;
        for (int64_t j = 0; j < kQBlock; ++j) {
            const float s = bf16_to_f32(sc[b * kQBlock + j]);
            uint16_t* o = out + (b * kQBlock + j) * K;
            for (int64_t k = 0; k < K; ++k) o[k] = f32_to_bf16(static_cast<float>(w[k * kQBlock + j]) * s);
        }
    }
}

}  // namespace

extern "C" {

int blora_lora_abi_version() { return 7; }

void blora_lora_add_f32(const float* x, int64_t xs, float* y, int64_t ys, int64_t in, int64_t n,
                        const int64_t* adapters, const int64_t* offsets, const int64_t* rows, int64_t threads) {
    run<float>(x, xs, y, ys, in, n, adapters, offsets, rows, threads);
}

void blora_lora_add_bf16(const uint16_t* x, int64_t xs, uint16_t* y, int64_t ys, int64_t in, int64_t n,
                         const int64_t* adapters, const int64_t* offsets, const int64_t* rows, int64_t threads) {
    run<uint16_t>(x, xs, y, ys, in, n, adapters, offsets, rows, threads);
}

void blora_int8_linear_bf16(const uint16_t* x, int64_t xs, int64_t m, int64_t k, const int8_t* qb,
                            const uint16_t* scales, int64_t n, uint16_t* y, int64_t ys, float* scratch,
                            int64_t threads) {
    int8_linear(x, xs, m, k, qb, scales, n, y, ys, scratch, threads);
}

void blora_int8_dequantize_bf16(const int8_t* qb, const uint16_t* scales, int64_t n, int64_t k, uint16_t* out,
                                int64_t threads) {
    int8_dequantize(qb, scales, n, k, out, threads);
}
}

extern "C" {

// q/out/caches as in AttnArgs; dtype by symbol. lens[b] >= 1 for every b.
#define BLORA_ATTN(NAME, T)                                                                                        \
    void NAME(const T* q, int64_t q_stride_n, int64_t q_stride_h, const int64_t* q_rows, const T* k_cache,           \
              const T* v_cache, int64_t cache_slots, const int64_t* slots, int64_t slots_stride, const int64_t* lens, \
              int64_t window, float scale, T* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t threads) {  \
        AttnArgs a{q, q_stride_n, q_stride_h, q_rows, k_cache, v_cache, cache_slots, slots, slots_stride,           \
                   lens, window, scale, out, B, H, KVH, D};                                                          \
        run_attention<T>(a, threads);                                                                                \
    }
BLORA_ATTN(blora_decode_attention_f32, float)
BLORA_ATTN(blora_decode_attention_bf16, uint16_t)
}

extern "C" {

int blora_native_vector() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(BLORA_GENERIC)
    return 1;
#else
    return 0;
#endif
}

#define BLORA_ELEMENTWISE(SUFFIX, T)                                                                           \
    void blora_rms_norm_##SUFFIX(const T* x, int64_t xs, T* res, int64_t rs, const T* w, T* out, int64_t os,   \
                                 int64_t n, int64_t hid, float eps, int64_t threads) {                         \
        rms_norm<T>(x, xs, res, rs, w, out, os, n, hid, eps, threads);                                          \
    }                                                                                                         \
    void blora_rotary_##SUFFIX(T* x, int64_t xs, int64_t heads, int64_t D, const T* cos, const T* sin,         \
                               int64_t cs, int64_t n, int64_t threads) {                                       \
        rotary<T>(x, xs, heads, D, cos, sin, cs, n, threads);                                                   \
    }                                                                                                         \
    void blora_silu_mul_##SUFFIX(const T* gu, int64_t gs, T* out, int64_t os, int64_t n, int64_t inter,        \
                                 int64_t threads) {                                                            \
        silu_mul<T>(gu, gs, out, os, n, inter, threads);                                                        \
    }                                                                                                           \
    void blora_store_kv_##SUFFIX(const T* k, const T* v, int64_t row_stride, int64_t head_stride, T* k_cache,  \
                                 T* v_cache, int64_t cache_slots, const int64_t* slots, int64_t n, int64_t kvh, \
                                 int64_t D) {                                                                  \
        store_kv<T>(k, v, row_stride, head_stride, k_cache, v_cache, cache_slots, slots, n, kvh, D);           \
    }                                                                                                         \
    void blora_argmax_##SUFFIX(const T* x, int64_t xs, int64_t n, int64_t v, int64_t* out, int64_t threads) {    \
        argmax_rows<T>(x, xs, n, v, out, threads);                                                             \
    }
BLORA_ELEMENTWISE(f32, float)
BLORA_ELEMENTWISE(bf16, uint16_t)
}
