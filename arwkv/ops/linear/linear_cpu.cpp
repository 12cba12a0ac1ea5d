// y = x W^T + bias with bf16 weights, fp32 activations and fp32 accumulation, for a few rows of x (decode).
//
// Built on first use by arwkv/ops/native_build.py and called through ctypes from arwkv/ops/linear/native.py.
// A decode step reads every weight once per token, so its speed is the memory bandwidth: bf16 weights halve
// the bytes. PyTorch's CPU bf16 matmul at 1-16 rows streams at about half the fp32 rate on the machines we
// measured, which cancels the saving; this kernel streams each weight row once, widens it to fp32 in
// registers and multiplies it into every row of x (x stays in L1). Layouts: x [M, I] fp32 or bf16; W [O, I]
// bf16 (nn.Linear's, `rows`) or [I, O] (x @ W, the mixers' LoRA matrices, `cols`); bias [O] fp32 or null;
// y [M, O] fp32 or bf16 (rounded to nearest even, as PyTorch rounds).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define ARWKV_AVX512 1
#endif

namespace {

template <typename Fn>
void run_tasks(int64_t n, int64_t threads, const Fn& fn) {
    threads = std::max<int64_t>(1, std::min(threads, n));
    if (threads == 1) {
        for (int64_t i = 0; i < n; ++i) fn(i);
        return;
    }
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    };
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
}

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

inline void store(float* y, float v) { *y = v; }
inline void store(uint16_t* y, float v) { *y = float_to_bf16(v); }
inline float load(const float* x) { return *x; }
inline float load(const uint16_t* x) { return bf16_to_float(*x); }

constexpr int64_t kRowsPerTask = 64;  // output rows per task: 64 x I x 2 bytes (72 KiB at I = 576)

#ifdef ARWKV_AVX512
inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_vec(const uint16_t* p, __mmask16 m) { return load_bf16(p, m); }
inline __m512 load_vec(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// WR weight rows against MR rows of x: MR x WR accumulators, each weight vector widened once. Several weight
// rows in flight keep enough loads outstanding to stream at the memory's rate.
template <int MR, int WR, typename XT, typename YT>
inline void rows(const XT* x, int64_t I, const uint16_t* w, const float* bias, YT* out, int64_t ldy) {
    __m512 acc[MR][WR];
    for (int m = 0; m < MR; ++m)
        for (int r = 0; r < WR; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < I; i += 16) {
        __mmask16 mask = I - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (I - i)) - 1);
        __m512 wv[WR];
        for (int r = 0; r < WR; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(w + (r + 4 * WR) * I + i), _MM_HINT_T0);
            wv[r] = load_bf16(w + r * I + i, mask);
        }
        for (int m = 0; m < MR; ++m) {
            __m512 xv = load_vec(x + m * I + i, mask);
            for (int r = 0; r < WR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < MR; ++m)
        for (int r = 0; r < WR; ++r)
            store(out + m * ldy + r, _mm512_reduce_add_ps(acc[m][r]) + (bias ? bias[r] : 0.0f));
}

template <int MR, int WR, typename XT, typename YT>
void block(const XT* x, int64_t I, const uint16_t* W, const float* bias, int64_t o0, int64_t o1,
           YT* y, int64_t ldy) {
    int64_t o = o0;
    for (; o + WR <= o1; o += WR) rows<MR, WR>(x, I, W + o * I, bias ? bias + o : nullptr, y + o, ldy);
    for (; o < o1; ++o) rows<MR, 1>(x, I, W + o * I, bias ? bias + o : nullptr, y + o, ldy);
}

template <typename XT, typename YT>
void task(const XT* x, int64_t M, int64_t I, const uint16_t* W, const float* bias, int64_t o0, int64_t o1,
          YT* y, int64_t O) {
    for (int64_t m = 0; m < M; m += 4) {
        const XT* xm = x + m * I;
        YT* ym = y + m * O;
        switch (std::min<int64_t>(4, M - m)) {
            case 4: block<4, 3>(xm, I, W, bias, o0, o1, ym, O); break;
            case 3: block<3, 4>(xm, I, W, bias, o0, o1, ym, O); break;
            case 2: block<2, 6>(xm, I, W, bias, o0, o1, ym, O); break;
            default: block<1, 8>(xm, I, W, bias, o0, o1, ym, O); break;
        }
    }
}
#else
template <typename XT, typename YT>
void task(const XT* x, int64_t M, int64_t I, const uint16_t* W, const float* bias, int64_t o0, int64_t o1,
          YT* y, int64_t O) {
    std::vector<float> row(I);
    for (int64_t o = o0; o < o1; ++o) {
        const uint16_t* w = W + o * I;
        for (int64_t i = 0; i < I; ++i) row[i] = bf16_to_float(w[i]);
        for (int64_t m = 0; m < M; ++m) {
            const XT* xm = x + m * I;
            float acc = 0.0f;
            for (int64_t i = 0; i < I; ++i) acc += load(xm + i) * row[i];
            store(y + m * O + o, acc + (bias ? bias[o] : 0.0f));
        }
    }
}
#endif

// x @ W for W [I, O]: each row i of W is scaled by x[m, i] into an fp32 row of y (o contiguous).
template <typename XT, typename YT>
void cols(const XT* x, int64_t M, int64_t I, int64_t O, const uint16_t* W, YT* y) {
    std::vector<float> acc(O), row(O);
    for (int64_t m = 0; m < M; ++m) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t i = 0; i < I; ++i) {
            const float xi = load(x + m * I + i);
            const uint16_t* w = W + i * O;
            for (int64_t o = 0; o < O; ++o) acc[o] += xi * bf16_to_float(w[o]);
        }
        for (int64_t o = 0; o < O; ++o) store(y + m * O + o, acc[o]);
    }
}

template <typename XT, typename YT>
void linear(int64_t M, int64_t I, int64_t O, const void* x, const uint16_t* W, const float* bias, void* y,
            int64_t threads) {
    const XT* xt = static_cast<const XT*>(x);
    YT* yt = static_cast<YT*>(y);
    int64_t tasks = (O + kRowsPerTask - 1) / kRowsPerTask;
    run_tasks(tasks, threads, [&](int64_t t) {
        int64_t o0 = t * kRowsPerTask, o1 = std::min(O, o0 + kRowsPerTask);
        task(xt, M, I, W, bias, o0, o1, yt, O);
    });
}

}  // namespace

extern "C" {

// y [M, O] = x [M, I] . W [O, I]^T (+ bias [O]); W holds bf16 bit patterns; x_bf16 / y_bf16: 0 = fp32,
// 1 = bf16. Returns 0.
int arwkv_linear_bf16(int64_t M, int64_t I, int64_t O, const void* x, int x_bf16, const uint16_t* W,
                      const float* bias, void* y, int y_bf16, int64_t threads) {
    if (x_bf16 && y_bf16) linear<uint16_t, uint16_t>(M, I, O, x, W, bias, y, threads);
    else if (x_bf16) linear<uint16_t, float>(M, I, O, x, W, bias, y, threads);
    else if (y_bf16) linear<float, uint16_t>(M, I, O, x, W, bias, y, threads);
    else linear<float, float>(M, I, O, x, W, bias, y, threads);
    return 0;
}

// y [M, O] = x [M, I] . W [I, O] (one thread: the mixers' small LoRA matrices). Returns 0.
int arwkv_matmul_bf16(int64_t M, int64_t I, int64_t O, const void* x, int x_bf16, const uint16_t* W, void* y,
                      int y_bf16) {
    if (x_bf16 && y_bf16) cols(static_cast<const uint16_t*>(x), M, I, O, W, static_cast<uint16_t*>(y));
    else if (x_bf16) cols(static_cast<const uint16_t*>(x), M, I, O, W, static_cast<float*>(y));
    else if (y_bf16) cols(static_cast<const float*>(x), M, I, O, W, static_cast<uint16_t*>(y));
    else cols(static_cast<const float*>(x), M, I, O, W, static_cast<float*>(y));
    return 0;
}

}  // extern "C"
