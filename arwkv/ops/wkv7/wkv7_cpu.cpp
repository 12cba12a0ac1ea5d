// RWKV-7 WKV on CPU: the per-token recurrence in C++, one (sequence, head) per task.
//
// Built on first use by arwkv/ops/native_build.py (g++ -O3 -march=native) and called through ctypes from
// arwkv/ops/wkv7/native.py, which owns shapes, dtypes and autograd. Math (fla layout, rows of h = key):
//   u_t = h_{t-1}^T a_t,   h_t = diag(d_t) h_{t-1} + k_t v_t^T + b_t u_t^T,   o_t = scale * h_t^T r_t
// with d_t = exp(w_t) passed in as `decay`. Per token and head that is 3*K*V multiply-adds (the chunked form
// needs 4*K*V + 9*C*K), on a K x V state that stays in L1; tasks share nothing, so threads never wait on each
// other except once at the end (a busy core slows only the tasks it runs: the others take the rest).
//
// The backward keeps the state at every `every`-th token of the forward (`ckpt`), recomputes the states of
// one such span at a time into a buffer, and runs the reverse recurrence through it:
//   dh_t += scale r_t do_t^T;  dr_t = scale h_t do_t;  dk_t = dh_t v_t;  dv_t = dh_t^T k_t;
//   db_t = dh_t u_t;  du_t = dh_t^T b_t;  dd_t = rowsum(dh_t * h_{t-1});  da_t = h_{t-1} du_t;
//   dh_{t-1} = diag(d_t) dh_t + a_t du_t^T.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

// Run fn(0..n-1) on up to `threads` threads that take tasks from a shared counter.
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

template <typename T>
struct Problem {
    int64_t nseq, H, K, V;
    const int64_t* offsets;  // [nseq + 1] token offsets of the sequences on the flat token axis
    const T *r, *decay, *k, *v, *a, *b;  // [tokens, H, K]; v [tokens, H, V]
    T scale;
    int64_t every;  // checkpoint spacing (tokens)
    std::vector<int64_t> first_ckpt;  // per sequence: index of its first checkpoint

    void index_checkpoints() {
        first_ckpt.assign(nseq + 1, 0);
        for (int64_t s = 0; s < nseq; ++s)
            first_ckpt[s + 1] = first_ckpt[s] + (offsets[s + 1] - offsets[s] + every - 1) / every;
    }
};

// u = h^T a (the state's read at the removal key of the first token of a span).
template <typename T, int KC, int VC>
inline void read_state(const T* __restrict h, const T* __restrict a, T* __restrict u, int64_t K_, int64_t V_) {
    const int64_t K = KC ? KC : K_, V = VC ? VC : V_;
    for (int64_t j = 0; j < V; ++j) u[j] = 0;
    for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < V; ++j) u[j] += a[i] * h[i * V + j];
}

// One token in a single pass over the rows of the state: h <- diag(d) h_in + k v^T + b u^T (h may be h_in)
// with u = h_in^T a given, and, in the same pass, o = scale h^T r (when o is not null) and u_next = h^T a_next (when a_next is
// not null: the next token's read, so no token reads the state twice), or, given g, dr = scale h g. KC, VC > 0 fix K and V at compile time
// (head size 64), which lets the row loops live in vector registers.
template <typename T, int KC, int VC>
inline void step(const T* h_in, T* h, const T* __restrict u, T* __restrict u_next, T* __restrict o,
                 const T* __restrict r, const T* __restrict d, const T* __restrict k, const T* __restrict v,
                 const T* __restrict b, const T* __restrict a_next, T scale, int64_t K_, int64_t V_,
                 const T* __restrict g = nullptr, T* __restrict dr = nullptr) {
    const int64_t K = KC ? KC : K_, V = VC ? VC : V_;
    T acc[VC ? VC : 1024], nxt[VC ? VC : 1024];  // V <= 1024 is checked by the caller
    for (int64_t j = 0; j < V; ++j) acc[j] = nxt[j] = 0;
    for (int64_t i = 0; i < K; ++i) {
        const T di = d[i], ki = k[i], bi = b[i], ri = o ? r[i] : T(0), ai = a_next ? a_next[i] : T(0);
        const T* row_in = h_in + i * V;
        T* row = h + i * V;
        if (g) {  // backward's recompute: dr = scale h g, so that the reverse pass need not read h again
            T sr = 0;
            for (int64_t j = 0; j < V; ++j) {
                const T x = row_in[j] * di + ki * v[j] + bi * u[j];
                row[j] = x;
                nxt[j] += ai * x;
                sr += x * g[j];
            }
            dr[i] = scale * sr;
            continue;
        }
        for (int64_t j = 0; j < V; ++j) {
            const T x = row_in[j] * di + ki * v[j] + bi * u[j];
            row[j] = x;
            acc[j] += ri * x;
            nxt[j] += ai * x;
        }
    }
    if (o)
        for (int64_t j = 0; j < V; ++j) o[j] = scale * acc[j];
    if (u_next)
        for (int64_t j = 0; j < V; ++j) u_next[j] = nxt[j];
}

// Rows of one head lie H*K apart in the inputs, a stride the hardware prefetcher loses at every page
// boundary; the tasks ask for the rows of a token kAhead tokens early instead.
template <typename T>
inline void prefetch_rows(const T* const* xs, int n, int64_t offset, int64_t bytes, bool write = false) {
    for (int q = 0; q < n; ++q)
        for (int64_t c = 0; c < bytes; c += 64) {
            const char* p = reinterpret_cast<const char*>(xs[q] + offset) + c;
            if (write)
                __builtin_prefetch(p, 1);
            else
                __builtin_prefetch(p);
        }
}

constexpr int64_t kAhead = 4;

template <typename T, int KC, int VC>
void forward_task(const Problem<T>& P, int64_t task, const T* h0, T* out, T* hT, T* ckpt) {
    const int64_t s = task / P.H, hd = task % P.H, H = P.H;
    const int64_t K = KC ? KC : P.K, V = VC ? VC : P.V, KV = K * V;
    std::vector<T> state(KV), u(2 * V);
    T* h = state.data();
    if (h0)
        std::memcpy(h, h0 + task * KV, KV * sizeof(T));
    else
        std::fill(state.begin(), state.end(), T(0));
    const int64_t t0 = P.offsets[s], t1 = P.offsets[s + 1];
    const T* ins[6] = {P.r, P.decay, P.k, P.a, P.b, P.v};
    if (t1 > t0) read_state<T, KC, VC>(h, P.a + (t0 * H + hd) * K, u.data(), K, V);
    for (int64_t t = t0; t < t1; ++t) {
        if (ckpt && (t - t0) % P.every == 0)
            std::memcpy(ckpt + ((P.first_ckpt[s] + (t - t0) / P.every) * H + hd) * KV, h, KV * sizeof(T));
        if (t + kAhead < t1) {
            prefetch_rows(ins, 5, ((t + kAhead) * H + hd) * K, K * sizeof(T));
            prefetch_rows(ins + 5, 1, ((t + kAhead) * H + hd) * V, V * sizeof(T));
            prefetch_rows(&out, 1, ((t + kAhead) * H + hd) * V, V * sizeof(T), true);
        }
        const int64_t x = (t * H + hd) * K, y = (t * H + hd) * V;
        T *cur = u.data() + ((t - t0) & 1) * V, *nxt = u.data() + (((t - t0) & 1) ^ 1) * V;
        const bool more = t + 1 < t1;
        step<T, KC, VC>(h, h, cur, more ? nxt : nullptr, out + y, P.r + x, P.decay + x, P.k + x, P.v + y,
                        P.b + x, more ? P.a + x + H * K : nullptr, P.scale, K, V);
    }
    if (hT) std::memcpy(hT + task * KV, h, KV * sizeof(T));
}

// One token of the backward: dh [K, V] (the gradient w.r.t. the state after token t, on entry; before it, on
// exit), hp the state before the token, u = hp^T a, g = do_t. Writes the token's input gradients but dr
// (the recompute wrote it).
template <typename T, int KC, int VC>
inline void reverse_step(T* __restrict dh, const T* __restrict hp, const T* __restrict u,
                         const T* __restrict g, const T* __restrict r, const T* __restrict d,
                         const T* __restrict k, const T* __restrict v, const T* __restrict a,
                         const T* __restrict b, T scale, T* __restrict dw, T* __restrict dk, T* __restrict dv,
                         T* __restrict da, T* __restrict db, int64_t K_, int64_t V_) {
    const int64_t K = KC ? KC : K_, V = VC ? VC : V_;
    T du[VC ? VC : 1024], dvt[VC ? VC : 1024];
    for (int64_t j = 0; j < V; ++j) du[j] = dvt[j] = 0;
    for (int64_t i = 0; i < K; ++i) {  // dh += scale r g^T, then its row reductions and column sums
        T* __restrict row = dh + i * V;
        const T* __restrict hpi = hp + i * V;
        const T sri = scale * r[i], ki = k[i], bi = b[i];
        T sk = 0, sb = 0, sd = 0;
        for (int64_t j = 0; j < V; ++j) {
            const T q = row[j] + sri * g[j];
            row[j] = q;
            sk += q * v[j];
            sb += q * u[j];
            sd += q * hpi[j];
            dvt[j] += ki * q;
            du[j] += bi * q;
        }
        dk[i] = sk;
        db[i] = sb;
        dw[i] = sd * d[i];  // w.r.t. the log-decay w: d = exp(w)
    }
    for (int64_t i = 0; i < K; ++i) {  // da = hp du, dh <- diag(d) dh + a du^T
        T* __restrict row = dh + i * V;
        const T* __restrict hpi = hp + i * V;
        const T di = d[i], ai = a[i];
        T sa = 0;
        for (int64_t j = 0; j < V; ++j) {
            sa += hpi[j] * du[j];
            row[j] = di * row[j] + ai * du[j];
        }
        da[i] = sa;
    }
    for (int64_t j = 0; j < V; ++j) dv[j] = dvt[j];
}

struct Grads {
    void *dr, *dw, *dk, *dv, *da, *db, *dh0;
};

template <typename T, int KC, int VC>
void backward_task(const Problem<T>& P, int64_t task, const T* ckpt, const T* dout, const T* dhT, Grads G) {
    const int64_t s = task / P.H, hd = task % P.H, H = P.H, E = P.every;
    const int64_t K = KC ? KC : P.K, V = VC ? VC : P.V, KV = K * V;
    // One buffer: the span's states from a 4 KiB boundary, then the state gradient dh 2 KiB off that grid.
    // Rows of dh and of the states are then never 4 KiB apart: the stores into dh would otherwise falsely
    // alias ("4K aliasing") the loads of the same rows of the states and stall every row of the backward.
    const int64_t page = 4096 / sizeof(T), states_size = ((E + 1) * KV + page - 1) / page * page;
    std::vector<T> buffer(page + states_size + page / 2 + KV), us(E * V);
    T* states = buffer.data() + (page - (reinterpret_cast<uintptr_t>(buffer.data()) % 4096) / sizeof(T)) % page;
    T* dh = states + states_size + page / 2;
    if (dhT)
        std::memcpy(dh, dhT + task * KV, KV * sizeof(T));
    else
        std::fill(dh, dh + KV, T(0));
    const int64_t t0 = P.offsets[s], t1 = P.offsets[s + 1];
    const T scale = P.scale;
    const T* ins[7] = {P.r, P.decay, P.k, P.a, P.b, P.v, dout};
    T* outs[6] = {static_cast<T*>(G.dr), static_cast<T*>(G.dw), static_cast<T*>(G.dk), static_cast<T*>(G.da),
                  static_cast<T*>(G.db), static_cast<T*>(G.dv)};
    for (int64_t c = (t1 - t0 + E - 1) / E - 1; c >= 0; --c) {
        const int64_t ts = t0 + c * E, te = std::min(ts + E, t1);
        std::memcpy(states, ckpt + ((P.first_ckpt[s] + c) * H + hd) * KV, KV * sizeof(T));
        read_state<T, KC, VC>(states, P.a + (ts * H + hd) * K, us.data(), K, V);
        for (int64_t t = ts; t < te; ++t) {  // recompute the span: states[j + 1] = h after token ts + j
            const int64_t j = t - ts, x = (t * H + hd) * K, y = (t * H + hd) * V;
            if (t + kAhead < te) {  // the rows the reverse pass reads too, r and do included
                prefetch_rows(ins, 5, ((t + kAhead) * H + hd) * K, K * sizeof(T));
                prefetch_rows(ins + 5, 2, ((t + kAhead) * H + hd) * V, V * sizeof(T));
            }
            T* h = states + (j + 1) * KV;
            const bool more = t + 1 < te;
            step<T, KC, VC>(h - KV, h, us.data() + j * V, more ? us.data() + (j + 1) * V : nullptr, nullptr,
                            nullptr, P.decay + x, P.k + x, P.v + y, P.b + x, more ? P.a + x + H * K : nullptr,
                            scale, K, V, dout + y, outs[0] + x);
        }
        for (int64_t t = te - 1; t >= ts; --t) {
            const int64_t j = t - ts, x = (t * H + hd) * K, y = (t * H + hd) * V;
            if (t - kAhead >= ts) {
                prefetch_rows(outs, 5, ((t - kAhead) * H + hd) * K, K * sizeof(T), true);
                prefetch_rows(outs + 5, 1, ((t - kAhead) * H + hd) * V, V * sizeof(T), true);
            }
            const T* hp = states + j * KV;
            reverse_step<T, KC, VC>(dh, hp, us.data() + j * V, dout + y, P.r + x, P.decay + x, P.k + x, P.v + y,
                                    P.a + x, P.b + x, scale, outs[1] + x, outs[2] + x, outs[5] + y, outs[3] + x,
                                    outs[4] + x, K, V);
        }
    }
    if (G.dh0) std::memcpy(static_cast<T*>(G.dh0) + task * KV, dh, KV * sizeof(T));
}

template <typename T>
Problem<T> problem(int64_t nseq, const int64_t* offsets, int64_t H, int64_t K, int64_t V, const void* r,
                   const void* decay, const void* k, const void* v, const void* a, const void* b, double scale,
                   int64_t every) {
    Problem<T> P{nseq, H, K, V, offsets,
                 static_cast<const T*>(r), static_cast<const T*>(decay), static_cast<const T*>(k),
                 static_cast<const T*>(v), static_cast<const T*>(a), static_cast<const T*>(b),
                 static_cast<T>(scale), every, {}};
    P.index_checkpoints();
    return P;
}

template <typename T>
void forward(const Problem<T>& P, const void* h0, void* out, void* hT, void* ckpt, int64_t threads) {
    auto fn = (P.K == 64 && P.V == 64) ? forward_task<T, 64, 64> : forward_task<T, 0, 0>;
    run_tasks(P.nseq * P.H, threads, [&](int64_t i) {
        fn(P, i, static_cast<const T*>(h0), static_cast<T*>(out), static_cast<T*>(hT), static_cast<T*>(ckpt));
    });
}

template <typename T>
void backward(const Problem<T>& P, const void* ckpt, const void* dout, const void* dhT, Grads G,
              int64_t threads) {
    auto fn = (P.K == 64 && P.V == 64) ? backward_task<T, 64, 64> : backward_task<T, 0, 0>;
    run_tasks(P.nseq * P.H, threads, [&](int64_t i) {
        fn(P, i, static_cast<const T*>(ckpt), static_cast<const T*>(dout), static_cast<const T*>(dhT), G);
    });
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = float64. h0, hT, ckpt may be null. Returns 0.
int arwkv_wkv7_forward(int dtype, int64_t nseq, const int64_t* offsets, int64_t H, int64_t K, int64_t V,
                       const void* r, const void* decay, const void* k, const void* v, const void* a,
                       const void* b, double scale, const void* h0, void* out, void* hT, void* ckpt,
                       int64_t every, int64_t threads) {
    if (V > 1024) return 1;
    if (dtype == 0)
        forward(problem<float>(nseq, offsets, H, K, V, r, decay, k, v, a, b, scale, every), h0, out, hT, ckpt,
                threads);
    else
        forward(problem<double>(nseq, offsets, H, K, V, r, decay, k, v, a, b, scale, every), h0, out, hT, ckpt,
                threads);
    return 0;
}

// dhT and dh0 may be null. Gradients are written for every token row (dw: w.r.t. the log-decay w).
int arwkv_wkv7_backward(int dtype, int64_t nseq, const int64_t* offsets, int64_t H, int64_t K, int64_t V,
                        const void* r, const void* decay, const void* k, const void* v, const void* a,
                        const void* b, double scale, const void* ckpt, int64_t every, const void* dout,
                        const void* dhT, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                        void* dh0, int64_t threads) {
    Grads G{dr, dw, dk, dv, da, db, dh0};
    if (dtype == 0)
        backward(problem<float>(nseq, offsets, H, K, V, r, decay, k, v, a, b, scale, every), ckpt, dout, dhT, G,
                 threads);
    else
        backward(problem<double>(nseq, offsets, H, K, V, r, decay, k, v, a, b, scale, every), ckpt, dout, dhT,
                 G, threads);
    return 0;
}

}  // extern "C"
