// Fused fp32 CPU kernels for the transformer block's elementwise work (lflm_dist/models/cpu_kernels.py
// builds this file on first use; the PyTorch formulas in blocks.py are the reference and the fallback).
//
// Why: PyTorch has no fused CPU RMSNorm with a backward; composed of tensor ops it costs ~6 kernels
// forward and ~10 backward, plus RoPE's complex multiply, per q and per k of every layer. Here one
// pass per row does RMSNorm (and, for q/k, RoPE after it), and the backward is written out as a
// C++ autograd node, so neither direction goes through Python.
//
//   y = rope(x * rstd * w),  rstd = 1 / sqrt(mean(x^2) + eps)                      (RMSNorm, Zhang & Sennrich 2019)
//   rope: (y[2j], y[2j+1]) -> (y[2j] cos a - y[2j+1] sin a, y[2j] sin a + y[2j+1] cos a)   (RoFormer, eq. 34)
//   backward: un-rotate g (the rotation's transpose), then gx = rstd * (g w - xh * mean(g w xh)),
//   gw = sum over rows of g xh, with xh = x * rstd.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// x86-64: an AVX2 clone of each row kernel beside the baseline one, picked at load time, so the
// cached binary runs on every x86-64 node that shares the cache (no -march=native).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LFLM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LFLM_CLONES
#endif

namespace {

// Rows are indexed (n, t, h) of a [N, T, H, D] view (a plain [rows, D] tensor is N = rows,
// T = H = 1); each tensor a kernel reads or writes places row (n, t, h) at n*s[0] + t*s[1] + h*s[2]
// with its D elements contiguous; t also indexes the rotation table `rope` [T, D] (cos, sin
// interleaved).
struct Geometry {
  int64_t N, T, H, D;
};
struct Strides {
  int64_t s[3];
  int64_t at(int64_t n, int64_t t, int64_t h) const { return n * s[0] + t * s[1] + h * s[2]; }
};

// Walks rows r0, r0 + 1, ... in (n, t, h) order without a division per row (three of them cost
// as much as a 32-wide row's arithmetic).
struct RowCursor {
  const Geometry& g;
  int64_t n, t, h;
  RowCursor(const Geometry& geo, int64_t r) : g(geo), n(r / (geo.T * geo.H)), t((r / geo.H) % geo.T), h(r % geo.H) {}
  void next() {
    if (++h < g.H) return;
    h = 0;
    if (++t < g.T) return;
    t = 0;
    ++n;
  }
};

LFLM_CLONES void forward_rows(const Geometry& geo, const float* x, Strides xs, const float* w, const float* rope,
                              float eps, float* y, Strides ys, float* rstd, int64_t r0, int64_t r1) {
  const int64_t D = geo.D;
  RowCursor c(geo, r0);
  for (int64_t r = r0; r < r1; ++r, c.next()) {
    const float* xr = x + xs.at(c.n, c.t, c.h);
    float* yr = y + ys.at(c.n, c.t, c.h);
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float rs = 1.f / std::sqrt(ss / D + eps);
    rstd[r] = rs;
    if (rope == nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * rs * w[i];
    } else {
      const float* cs = rope + c.t * D;
#pragma omp simd
      for (int64_t j = 0; j < D / 2; ++j) {
        const float a = xr[2 * j] * rs * w[2 * j], b = xr[2 * j + 1] * rs * w[2 * j + 1];
        const float co = cs[2 * j], si = cs[2 * j + 1];
        yr[2 * j] = a * co - b * si;
        yr[2 * j + 1] = a * si + b * co;
      }
    }
  }
}

// gw_part: this chunk's partial sum of g * xh (the caller sums the chunks); gn: scratch [D].
LFLM_CLONES void backward_rows(const Geometry& geo, const float* x, Strides xs, const float* w, const float* rope,
                               const float* rstd, const float* g, Strides gs, float* gx, Strides gxs, float* gw_part,
                               float* gn, int64_t r0, int64_t r1) {
  const int64_t D = geo.D;
  RowCursor c(geo, r0);
  for (int64_t r = r0; r < r1; ++r, c.next()) {
    const float* xr = x + xs.at(c.n, c.t, c.h);
    const float* gr = g + gs.at(c.n, c.t, c.h);
    if (rope != nullptr) {  // the rotation's transpose: rotate g by -a
      const float* cs = rope + c.t * D;
#pragma omp simd
      for (int64_t j = 0; j < D / 2; ++j) {
        const float co = cs[2 * j], si = cs[2 * j + 1];
        gn[2 * j] = gr[2 * j] * co + gr[2 * j + 1] * si;
        gn[2 * j + 1] = gr[2 * j + 1] * co - gr[2 * j] * si;
      }
      gr = gn;
    }
    const float rs = rstd[r];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < D; ++i) {
      const float xh = xr[i] * rs;
      dot += gr[i] * w[i] * xh;
      gw_part[i] += gr[i] * xh;
    }
    const float m = dot / D;
    float* gxr = gx + gxs.at(c.n, c.t, c.h);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) gxr[i] = rs * (gr[i] * w[i] - xr[i] * rs * m);
  }
}

void check_float_cpu(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "lflm cpu kernels: ", what,
              " must be an fp32 CPU tensor");
  TORCH_CHECK(t.dim() >= 1 && t.stride(-1) == 1, "lflm cpu kernels: ", what, "'s last dimension must be contiguous");
}

// (geometry, x's strides): a 4-d x is [N, T, H, D] with any strides but the last; any other is
// contiguous rows.
std::pair<Geometry, Strides> layout_of(const Tensor& x, bool rows_4d) {
  const int64_t D = x.size(-1);
  if (rows_4d) {
    TORCH_CHECK(x.dim() == 4, "lflm cpu kernels: rms_norm_rope takes x [N, T, H, D]");
    return {Geometry{x.size(0), x.size(1), x.size(2), D}, Strides{{x.stride(0), x.stride(1), x.stride(2)}}};
  }
  TORCH_CHECK(x.is_contiguous(), "lflm cpu kernels: rms_norm takes a contiguous x");
  return {Geometry{D ? x.numel() / D : 0, 1, 1, D}, Strides{{D, 0, 0}}};
}

Strides contiguous_strides(const Geometry& g) { return Strides{{g.T * g.H * g.D, g.H * g.D, g.D}}; }

// Rows per gradient-of-w chunk: fixed by the row count alone, so gw sums in the same order at
// any thread count (a 1-process run and a 2-process run give the same bits per row set).
int64_t n_chunks(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(16, rows / 32)); }

// RMSNorm over the last dimension; with a rotation table (rope.numel() > 0), of each head row
// of x [N, T, H, D], rotated after, and written heads-first, y [N, H, T, D]: the layout
// scaled_dot_product_attention takes, so neither q/k nor their grads need a transposing copy.
struct RMSNormRope : public torch::autograd::Function<RMSNormRope> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& rope, double eps) {
    check_float_cpu(x, "x");
    const bool rot = rope.numel() > 0;
    auto [geo, xs] = layout_of(x, rot);
    const int64_t D = geo.D, rows = geo.N * geo.T * geo.H;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D,
                "lflm cpu kernels: the weight must be fp32 [", D, "]");
    Tensor y;
    Strides ys;
    if (rot) {
      TORCH_CHECK(D % 2 == 0 && rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.numel() == geo.T * D,
                  "lflm cpu kernels: rope must be fp32 [T, D] for x [N, T, H, D]");
      y = torch::empty({geo.N, geo.H, geo.T, D}, x.options());
      ys = Strides{{geo.H * geo.T * D, D, geo.T * D}};
    } else {
      y = torch::empty(x.sizes(), x.options());
      ys = xs;
    }
    auto rstd = torch::empty({rows}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = rot ? rope.data_ptr<float>() : nullptr;
    float *yp = y.data_ptr<float>(), *sp = rstd.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      forward_rows(geo, xp, xs, wp, rp, (float)eps, yp, ys, sp, b, e);
    });
    ctx->save_for_backward({x, w, rope, rstd});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &rope = saved[2], &rstd = saved[3];
    const bool rot = rope.numel() > 0;
    auto [geo, xs] = layout_of(x, rot);
    Tensor g = grads[0];
    Strides gs;
    if (rot) {  // g [N, H, T, D], any strides but the last
      if (g.stride(-1) != 1) g = g.contiguous();
      gs = Strides{{g.stride(0), g.stride(2), g.stride(1)}};
    } else {
      g = g.contiguous();
      gs = xs;
    }
    const int64_t D = geo.D, rows = rstd.numel(), nc = n_chunks(rows);
    auto gx = torch::empty(x.sizes(), x.options());  // contiguous: row r at r * D
    auto gw_parts = torch::zeros({nc, D}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = rot ? rope.data_ptr<float>() : nullptr,
                *sp = rstd.data_ptr<float>(), *gp = g.data_ptr<float>();
    float *gxp = gx.data_ptr<float>(), *pp = gw_parts.data_ptr<float>();
    at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
      std::vector<float> gn(rot ? D : 0);
      for (int64_t c = b; c < e; ++c)
        backward_rows(geo, xp, xs, wp, rp, sp, gp, gs, gxp, contiguous_strides(geo), pp + c * D, gn.data(),
                      rows * c / nc, rows * (c + 1) / nc);
    });
    return {gx, gw_parts.sum(0), Tensor(), Tensor()};
  }
};

// The attention's inputs from its fused projection qkv [B, T, 3, H, hd] (last dim contiguous):
// q and k RMSNormed per head row and rotated, v copied, all three written heads-first
// [B, H, T, hd]. One node instead of two norms, two rotations, three transposes and, in
// backward, the stack of the three grads: they are written straight into qkv's grad.
struct QKVNormRope : public torch::autograd::Function<QKVNormRope> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& qkv, const Tensor& wq, const Tensor& wk,
                             const Tensor& rope, double eps) {
    check_float_cpu(qkv, "qkv");
    TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, "lflm cpu kernels: qkv must be [B, T, 3, H, hd]");
    const Geometry geo{qkv.size(0), qkv.size(1), qkv.size(3), qkv.size(4)};
    const int64_t D = geo.D, rows = geo.N * geo.T * geo.H;
    for (const Tensor* w : {&wq, &wk})
      TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->numel() == D,
                  "lflm cpu kernels: the QK-norm weights must be fp32 [", D, "]");
    TORCH_CHECK(D % 2 == 0 && rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.numel() == geo.T * D,
                "lflm cpu kernels: rope must be fp32 [T, hd]");
    const Strides xs{{qkv.stride(0), qkv.stride(1), qkv.stride(3)}}, ys{{geo.H * geo.T * D, D, geo.T * D}};
    auto opts = qkv.options();
    Tensor q = torch::empty({geo.N, geo.H, geo.T, D}, opts), k = torch::empty_like(q), v = torch::empty_like(q);
    Tensor rstd = torch::empty({2, rows}, opts);
    const float *xp = qkv.data_ptr<float>(), *rp = rope.data_ptr<float>();
    const int64_t part = qkv.stride(2);
    float *sp = rstd.data_ptr<float>(), *vp = v.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      forward_rows(geo, xp, xs, wq.data_ptr<float>(), rp, (float)eps, q.data_ptr<float>(), ys, sp, b, e);
      forward_rows(geo, xp + part, xs, wk.data_ptr<float>(), rp, (float)eps, k.data_ptr<float>(), ys, sp + rows, b, e);
      RowCursor c(geo, b);
      for (int64_t r = b; r < e; ++r, c.next())
        std::memcpy(vp + ys.at(c.n, c.t, c.h), xp + 2 * part + xs.at(c.n, c.t, c.h), D * sizeof(float));
    });
    ctx->save_for_backward({qkv, wq, wk, rope, rstd});
    return {q, k, v};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &qkv = saved[0], &wq = saved[1], &wk = saved[2], &rope = saved[3], &rstd = saved[4];
    const Geometry geo{qkv.size(0), qkv.size(1), qkv.size(3), qkv.size(4)};
    const int64_t D = geo.D, rows = geo.N * geo.T * geo.H, nc = n_chunks(rows), part = qkv.stride(2);
    const Strides xs{{qkv.stride(0), qkv.stride(1), qkv.stride(3)}};
    Tensor g[3];
    Strides gs[3];
    for (int i = 0; i < 3; ++i) {  // [B, H, T, hd], any strides but the last; an unused output's grad is zero
      g[i] = grads[i].defined() ? grads[i] : torch::zeros({geo.N, geo.H, geo.T, D}, qkv.options());
      if (g[i].stride(-1) != 1) g[i] = g[i].contiguous();
      gs[i] = Strides{{g[i].stride(0), g[i].stride(2), g[i].stride(1)}};
    }
    auto gqkv = torch::empty({geo.N, geo.T, 3, geo.H, D}, qkv.options());
    const Strides gxs{{geo.T * 3 * geo.H * D, 3 * geo.H * D, D}};
    auto gw_parts = torch::zeros({2, nc, D}, qkv.options());
    const float *xp = qkv.data_ptr<float>(), *rp = rope.data_ptr<float>(), *sp = rstd.data_ptr<float>();
    float *gxp = gqkv.data_ptr<float>(), *pp = gw_parts.data_ptr<float>();
    const int64_t gpart = geo.H * D;
    at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
      std::vector<float> gn(D);
      for (int64_t c = b; c < e; ++c) {
        const int64_t r0 = rows * c / nc, r1 = rows * (c + 1) / nc;
        backward_rows(geo, xp, xs, wq.data_ptr<float>(), rp, sp, g[0].data_ptr<float>(), gs[0], gxp, gxs, pp + c * D,
                      gn.data(), r0, r1);
        backward_rows(geo, xp + part, xs, wk.data_ptr<float>(), rp, sp + rows, g[1].data_ptr<float>(), gs[1],
                      gxp + gpart, gxs, pp + (nc + c) * D, gn.data(), r0, r1);
        RowCursor cur(geo, r0);
        const float* gv = g[2].data_ptr<float>();
        for (int64_t r = r0; r < r1; ++r, cur.next())
          std::memcpy(gxp + 2 * gpart + gxs.at(cur.n, cur.t, cur.h), gv + gs[2].at(cur.n, cur.t, cur.h), D * sizeof(float));
      }
    });
    auto gw = gw_parts.sum(1);
    return {gqkv, gw[0], gw[1], Tensor(), Tensor()};
  }
};

// adaLN's modulated RMSNorm (DiT, Peebles & Xie 2023): y = n * (1 + scale_g) + shift_g with
// n = x * rstd * w, for x [B, T, D] and shift / scale [B, G, D] (last dim contiguous), row t of
// sequence b in group g = t / (T / G). Backward, per row: gshift_g += gy, gscale_g += gy * n,
// gn = gy * (1 + scale_g), then RMSNorm's gx and gw from gn. One pass each way instead of the
// norm, a product and a sum forward and, backward, a product and two group reductions more. Work
// is split by whole groups, so each group's sums are written by one thread, and gw sums fixed
// chunks of groups in a fixed order (the same bits at any thread count).
struct ModGeometry {
  int64_t B, T, G, D, sb, sg;  // shift/scale row (b, g) at b * sb + g * sg
};

LFLM_CLONES void modulate_forward_groups(const ModGeometry& m, const float* x, const float* w, const float* sh,
                                         const float* sc, float eps, float* y, float* rstd, int64_t g0, int64_t g1) {
  const int64_t D = m.D, R = m.T / m.G;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t b = grp / m.G, g = grp % m.G;
    const float *shr = sh + b * m.sb + g * m.sg, *scr = sc + b * m.sb + g * m.sg;
    for (int64_t r = grp * R; r < (grp + 1) * R; ++r) {
      const float* xr = x + r * D;
      float* yr = y + r * D;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
      const float rs = 1.f / std::sqrt(ss / D + eps);
      rstd[r] = rs;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * rs * w[i] * (1.f + scr[i]) + shr[i];
    }
  }
}

LFLM_CLONES void modulate_backward_groups(const ModGeometry& m, const float* x, const float* w, const float* sc,
                                          const float* rstd, const float* gy, float* gx, float* gsh, float* gsc,
                                          float* gw_part, int64_t g0, int64_t g1) {
  const int64_t D = m.D, R = m.T / m.G;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t b = grp / m.G, g = grp % m.G;
    const float* scr = sc + b * m.sb + g * m.sg;
    float *gshr = gsh + grp * D, *gscr = gsc + grp * D;  // [B, G, D] contiguous
    std::fill(gshr, gshr + D, 0.f);
    std::fill(gscr, gscr + D, 0.f);
    for (int64_t r = grp * R; r < (grp + 1) * R; ++r) {
      const float *xr = x + r * D, *gr = gy + r * D;
      const float rs = rstd[r];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < D; ++i) {
        const float xh = xr[i] * rs, gn = gr[i] * (1.f + scr[i]);
        gshr[i] += gr[i];
        gscr[i] += gr[i] * xh * w[i];
        dot += gn * w[i] * xh;
        gw_part[i] += gn * xh;
      }
      const float mean = dot / D;
      float* gxr = gx + r * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) gxr[i] = rs * (gr[i] * (1.f + scr[i]) * w[i] - xr[i] * rs * mean);
    }
  }
}

struct RMSNormModulate : public torch::autograd::Function<RMSNormModulate> {
  static ModGeometry geometry(const Tensor& x, const Tensor& shift, const Tensor& scale) {
    TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "lflm cpu kernels: x must be contiguous [B, T, D]");
    const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
    TORCH_CHECK(shift.dim() == 3 && shift.sizes() == scale.sizes() && shift.strides() == scale.strides() &&
                    shift.size(0) == B && shift.size(2) == D && shift.stride(2) == 1 && shift.size(1) > 0 &&
                    T % shift.size(1) == 0,
                "lflm cpu kernels: shift and scale must be [B, G, D] alike (last dim contiguous), G dividing T");
    return ModGeometry{B, T, shift.size(1), D, shift.stride(0), shift.stride(1)};
  }

  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& shift,
                        const Tensor& scale, double eps) {
    for (const Tensor* t : {&x, &w, &shift, &scale}) check_float_cpu(*t, "x, w, shift and scale");
    const ModGeometry m = geometry(x, shift, scale);
    TORCH_CHECK(w.is_contiguous() && w.numel() == m.D, "lflm cpu kernels: the weight must be fp32 [", m.D, "]");
    auto y = torch::empty(x.sizes(), x.options());
    auto rstd = torch::empty({m.B * m.T}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *shp = shift.data_ptr<float>(),
                *scp = scale.data_ptr<float>();
    float *yp = y.data_ptr<float>(), *sp = rstd.data_ptr<float>();
    const int64_t rows_per_group = m.T / m.G;
    at::parallel_for(0, m.B * m.G, std::max<int64_t>(1, 8192 / std::max<int64_t>(m.D * rows_per_group, 1)),
                     [&](int64_t b, int64_t e) { modulate_forward_groups(m, xp, wp, shp, scp, (float)eps, yp, sp, b, e); });
    ctx->save_for_backward({x, w, shift, scale, rstd});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &shift = saved[2], &scale = saved[3], &rstd = saved[4];
    const ModGeometry m = geometry(x, shift, scale);
    Tensor gy = grads[0].contiguous();
    const int64_t groups = m.B * m.G, nc = std::max<int64_t>(1, std::min<int64_t>(16, groups));
    auto gx = torch::empty(x.sizes(), x.options());
    auto gsh = torch::empty({m.B, m.G, m.D}, x.options()), gsc = torch::empty({m.B, m.G, m.D}, x.options());
    auto gw_parts = torch::zeros({nc, m.D}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *scp = scale.data_ptr<float>(),
                *sp = rstd.data_ptr<float>(), *gp = gy.data_ptr<float>();
    float *gxp = gx.data_ptr<float>(), *gshp = gsh.data_ptr<float>(), *gscp = gsc.data_ptr<float>(),
          *pp = gw_parts.data_ptr<float>();
    at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        modulate_backward_groups(m, xp, wp, scp, sp, gp, gxp, gshp, gscp, pp + c * m.D, groups * c / nc,
                                 groups * (c + 1) / nc);
    });
    return {gx, gw_parts.sum(0), gsh, gsc, Tensor()};
  }
};

Tensor rms_norm_modulate(const Tensor& x, const Tensor& w, const Tensor& shift, const Tensor& scale, double eps) {
  return RMSNormModulate::apply(x, w, shift, scale, eps);
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  return RMSNormRope::apply(x, w, at::empty({0}, x.options()), eps);
}

std::vector<Tensor> qkv_norm_rope(const Tensor& qkv, const Tensor& wq, const Tensor& wk, const Tensor& rope, double eps) {
  return QKVNormRope::apply(qkv, wq, wk, rope, eps);
}

Tensor rms_norm_rope(const Tensor& x, const Tensor& w, const Tensor& rope, double eps) {
  TORCH_CHECK(rope.numel() > 0, "lflm cpu kernels: rms_norm_rope needs a rotation table");
  return RMSNormRope::apply(x, w, rope, eps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * w over the last dimension (fp32, CPU; with backward)");
  m.def("rms_norm_modulate", &rms_norm_modulate,
        "rms_norm(x, w) * (1 + scale) + shift for x [B, T, D], shift / scale [B, G, D] per group of T / G rows");
  m.def("qkv_norm_rope", &qkv_norm_rope,
        "qkv [B, T, 3, H, hd] -> (q, k, v) [B, H, T, hd]: q and k RMSNormed (wq, wk) and rotated by rope [T, hd]");
  m.def("rms_norm_rope", &rms_norm_rope,
        "RMSNorm of each head row of x [N, T, H, D], then RoPE by rope [T, D] (cos, sin interleaved); returns [N, H, T, D]");
}
