// conv2d (NCHW, OIHW; groups, strides, dilations, asymmetric padding): depthwise direct loops,
// the AVX2/AVX-512 direct form of conv_avx2.h, or im2col + BLAS GEMM: the kernel of table row
// "conv2d".
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "call.h"
#include "conv_avx2.h"
#include "conv_winograd.h"

namespace mtc {
namespace {

// the 9 parameters a call carries, in order: stride h/w, padding top/left/bottom/right,
// dilation h/w, groups (mtcompile.ir.ops.ConvParams.flat)
void read_params(const char* op, const tvm::ffi::Shape& params, ConvGeom& q) {
  if (params.size() != 9)
    TVM_FFI_THROW(ValueError) << op
                              << ": params must be 9 values (stride h/w, padding "
                                 "top/left/bottom/right, dilation h/w, groups), found "
                              << params.size();
  q.sh = params[0], q.sw = params[1];
  q.pt = params[2], q.pl = params[3], q.pb = params[4], q.pr = params[5];
  q.dh = params[6], q.dw = params[7], q.G = params[8];
  if (q.sh < 1 || q.sw < 1 || q.dh < 1 || q.dw < 1 || q.G < 1 || q.pt < 0 || q.pl < 0 ||
      q.pb < 0 || q.pr < 0)
    TVM_FFI_THROW(ValueError) << op << ": bad params: strides " << q.sh << "," << q.sw
                              << " padding " << q.pt << "," << q.pl << "," << q.pb << "," << q.pr
                              << " dilation " << q.dh << "," << q.dw << " groups " << q.G;
}

ConvGeom conv_geom(const char* op, const TensorView& x, const TensorView& w,
                   const tvm::ffi::Shape& params, const TensorView& out) {
  ConvGeom q{};
  read_params(op, params, q);
  q.N = x.size(0), q.C = x.size(1), q.H = x.size(2), q.W = x.size(3);
  q.O = w.size(0), q.KH = w.size(2), q.KW = w.size(3);
  if (q.C % q.G != 0 || q.O % q.G != 0 || w.size(1) != q.C / q.G)
    TVM_FFI_THROW(ValueError) << op << ": x " << shape_str(x) << ", weight " << shape_str(w)
                              << " and groups " << q.G << " do not match";
  q.Cg = q.C / q.G, q.Og = q.O / q.G;
  q.OH = (q.H + q.pt + q.pb - q.dh * (q.KH - 1) - 1) / q.sh + 1;
  q.OW = (q.W + q.pl + q.pr - q.dw * (q.KW - 1) - 1) / q.sw + 1;
  if (q.OH <= 0 || q.OW <= 0)
    TVM_FFI_THROW(ValueError) << op << ": the (dilated) kernel " << w.size(2) << "x" << w.size(3)
                              << " is larger than the padded input of x " << shape_str(x);
  if (out.size(0) != q.N || out.size(1) != q.O || out.size(2) != q.OH || out.size(3) != q.OW)
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected ["
                              << q.N << ", " << q.O << ", " << q.OH << ", " << q.OW << "]";
  return q;
}

// col[k, p] for k over (c, kh, kw) of group g and p over output pixels [p0, p1) of image n
void im2col(const ConvGeom& q, const float* x, int64_t p0, int64_t p1, float* col) {
  const int64_t np = p1 - p0;
  for (int64_t c = 0; c < q.Cg; ++c) {
    const float* xc = x + c * q.H * q.W;
    for (int64_t kh = 0; kh < q.KH; ++kh) {
      for (int64_t kw = 0; kw < q.KW; ++kw) {
        float* dst = col + ((c * q.KH + kh) * q.KW + kw) * np;
        int64_t p = p0;
        while (p < p1) {
          const int64_t oh = p / q.OW, ow0 = p % q.OW;
          const int64_t run = std::min(q.OW - ow0, p1 - p);
          const int64_t ih = oh * q.sh - q.pt + kh * q.dh;
          float* d = dst + (p - p0);
          if (ih < 0 || ih >= q.H) {
            std::memset(d, 0, run * sizeof(float));
          } else {
            const float* src = xc + ih * q.W;
            int64_t iw = ow0 * q.sw - q.pl + kw * q.dw;
            if (q.sw == 1 && iw >= 0 && iw + run <= q.W) {
              std::memcpy(d, src + iw, run * sizeof(float));
            } else {
              for (int64_t j = 0; j < run; ++j, iw += q.sw)
                d[j] = (iw >= 0 && iw < q.W) ? src[iw] : 0.f;
            }
          }
          p += run;
        }
      }
    }
  }
}

// one input channel per group (depthwise, with any channel multiplier): direct loops
inline __attribute__((always_inline)) void depthwise_body(const ConvGeom& q, const float* x,
                                                          const float* w, const float* bias,
                                                          float* y, int64_t n, int64_t o) {
  const int64_t g = o / q.Og;
  const float* xc = x + (n * q.C + g) * q.H * q.W;
  const float* wk = w + o * q.KH * q.KW;
  float* yo = y + (n * q.O + o) * q.OH * q.OW;
  const float b = bias ? bias[o] : 0.f;
  for (int64_t i = 0; i < q.OH * q.OW; ++i) yo[i] = b;
  for (int64_t kh = 0; kh < q.KH; ++kh) {
    for (int64_t oh = 0; oh < q.OH; ++oh) {
      const int64_t ih = oh * q.sh - q.pt + kh * q.dh;
      if (ih < 0 || ih >= q.H) continue;
      const float* xr = xc + ih * q.W;
      float* yr = yo + oh * q.OW;
      for (int64_t kw = 0; kw < q.KW; ++kw) {
        const float wv = wk[kh * q.KW + kw];
        // output columns whose input column lies inside the image
        const int64_t off = kw * q.dw - q.pl;
        int64_t lo = off >= 0 ? 0 : (-off + q.sw - 1) / q.sw;
        int64_t hi = (q.W - 1 - off) >= 0 ? (q.W - 1 - off) / q.sw + 1 : 0;
        hi = std::min(hi, q.OW);
        if (q.sw == 1) {
          const float* xs = xr + off;
          for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xs[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow * q.sw + off];
        }
      }
    }
  }
}

// the loops vectorize 8-wide where the CPU has AVX2+FMA (the library is built for generic x86-64)
__attribute__((target("avx2,fma"))) void conv_depthwise_avx2(const ConvGeom& q, const float* x,
                                                             const float* w, const float* bias,
                                                             float* y, int64_t n, int64_t o) {
  depthwise_body(q, x, w, bias, y, n, o);
}
void conv_depthwise_generic(const ConvGeom& q, const float* x, const float* w,
                            const float* bias, float* y, int64_t n, int64_t o) {
  depthwise_body(q, x, w, bias, y, n, o);
}

void conv_depthwise(const ConvGeom& q, const float* px, const float* pw, const float* bias,
                    float* py, const Epilogue& ep) {
  const int64_t P = q.OH * q.OW;
  const int64_t work = q.N * q.O * P * q.Cg * q.KH * q.KW;
  const auto body = kHasAvx2 ? conv_depthwise_avx2 : conv_depthwise_generic;
  parallel(work, q.N * q.O, [&](int64_t task, int64_t ntask) {
    auto [t0, t1] = part(q.N * q.O, task, ntask, 1);
    for (int64_t t = t0; t < t1; ++t) {
      body(q, px, pw, bias, py, t / q.O, t % q.O);
      finish_block(ep, py, t * P, P, 1, P);
    }
  });
}

// the calling thread's packed weights (conv_avx2.h), kept between calls
float* pack_conv_weights(const ConvGeom& c, const float* pw, const Tiles& tiles) {
  const int64_t Kd = c.Cg * c.KH * c.KW;
  thread_local std::vector<float> wp;
  if (wp.size() < static_cast<size_t>(c.O * Kd)) wp.resize(c.O * Kd);
  for (int64_t g = 0; g < c.G; ++g)
    pack_weights(pw + g * c.Og * Kd, c.Og, Kd, tiles.strip, wp.data() + g * c.Og * Kd);
  return wp.data();
}

// the images [n0, n0 + ng) of the direct form: padded copies (xpp), then the panels
void conv_direct_images(const ConvGeom& c, const Padded& pd, const Tiles& tiles, int64_t n0,
                        int64_t ng, const float* px, const float* wpp, float* xpp,
                        const float* bias, float* py, const Epilogue& ep) {
  const int64_t Kd = c.Cg * c.KH * c.KW, cf = pd.channel_floats(), per_image = c.C * cf;
  const int64_t panels = c.OH * ((c.OW + kNR - 1) / kNR), units = ng * c.G * panels;
  const float* xn = px + n0 * c.C * c.H * c.W;
  // two launches, not one with a barrier between the phases: a barrier ties each task to
  // a thread of its own, so one descheduled worker would stall it (a busy host)
  const int64_t work = ng * c.O * c.OH * c.OW * Kd;
  parallel(work, units, [&](int64_t task, int64_t ntask) {  // pad the channels
    auto [u0, u1] = part(ng * c.C, task, ntask, 1);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / c.C, ch = u % c.C;
      pad_channels(c, pd, xn + n * c.C * c.H * c.W, ch, ch + 1, xpp + n * per_image);
    }
  });
  parallel(work, units, [&](int64_t task, int64_t ntask) {  // then compute the panels
    auto [t0, t1] = part(units, task, ntask, 1);
    for (int64_t t = t0; t < t1;) {  // a task's run of panels may span images and groups
      const int64_t u = t / panels, end = std::min(t1, (u + 1) * panels);
      const int64_t n = u / c.G, g = u % c.G;
      const int64_t at = ((n0 + n) * c.O + g * c.Og) * c.OH * c.OW;
      conv_panels(c, pd, tiles, xpp + n * per_image + g * c.Cg * cf, wpp + g * c.Og * Kd,
                  bias ? bias + g * c.Og : nullptr, py + at, t - u * panels, end - u * panels,
                  ep.res_at(at), ep.act);
      t = end;
    }
  });
}

// the AVX2 path: a padded copy of the input, packed weights, 16-pixel tiles over the pool
// (see conv_avx2.h)
void conv_direct(const ConvGeom& c, const float* px, const float* pw, const float* bias,
                 float* py, const Epilogue& ep) {
  const Padded pd(c);
  const Tiles tiles = tiles_for(c.KW, kHasAvx512);
  const float* wpp = pack_conv_weights(c, pw, tiles);
  // images in groups of about 512 KB of padded input: two launches per group (a batch of
  // small images made two per image, 256 launches for a batch of 16 through a small ResNet)
  const int64_t per_image = c.C * pd.channel_floats();
  const int64_t group = std::clamp<int64_t>((int64_t{1} << 17) / per_image, 1, c.N);
  // the calling thread's buffer, kept between calls (pad_channels writes every float)
  thread_local std::vector<float> xp;
  if (xp.size() < static_cast<size_t>(group * per_image)) xp.resize(group * per_image);
  for (int64_t n0 = 0; n0 < c.N; n0 += group)
    conv_direct_images(c, pd, tiles, n0, std::min(group, c.N - n0), px, wpp, xp.data(), bias,
                       py, ep);
}

// im2col (or x itself for a 1x1, stride 1, unpadded conv) + GEMM, tiles over (image, group,
// pixel block); pixel blocks of 64+ columns keep each GEMM wide
void conv_gemm(const ConvGeom& q, const float* px, const float* pw, const float* bias,
               float* py, const Epilogue& ep) {
  const int64_t P = q.OH * q.OW, Kd = q.Cg * q.KH * q.KW, work = q.N * q.O * P * Kd;
  const bool direct = q.KH == 1 && q.KW == 1 && q.sh == 1 && q.sw == 1 && q.pt == 0 &&
                      q.pl == 0 && q.pb == 0 && q.pr == 0;
  const int64_t units = q.N * q.G;
  parallel(work, units * std::max<int64_t>(1, P / 64), [&](int64_t task, int64_t ntask) {
    int64_t pparts = units >= ntask ? 1 : (ntask + units - 1) / units;
    pparts = std::max<int64_t>(1, std::min(pparts, P / 64));
    auto [t0, t1] = part(units * pparts, task, ntask, 1);
    thread_local std::vector<float> scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u = t / pparts, n = u / q.G, g = u % q.G;
      auto [p0, p1] = part(P, t % pparts, pparts, 16);
      if (p1 <= p0) continue;
      const float* xg = px + (n * q.C + g * q.Cg) * q.H * q.W;
      const float* wg = pw + g * q.Og * Kd;
      float* yg = py + (n * q.O + g * q.Og) * P + p0;
      float beta = 0.f;
      if (bias) {
        for (int64_t o = 0; o < q.Og; ++o) std::fill(yg + o * P, yg + o * P + (p1 - p0),
                                                     bias[g * q.Og + o]);
        beta = 1.f;
      }
      if (direct) {
        sgemm(q.Og, p1 - p0, Kd, wg, Kd, xg + p0, P, beta, yg, P);
      } else {
        if (scratch.size() < static_cast<size_t>(Kd * (p1 - p0))) scratch.resize(Kd * (p1 - p0));
        im2col(q, xg, p0, p1, scratch.data());
        sgemm(q.Og, p1 - p0, Kd, wg, Kd, scratch.data(), p1 - p0, beta, yg, P);
      }
      finish_block(ep, py, (n * q.O + g * q.Og) * P + p0, P, q.Og, p1 - p0);
    }
  });
}

// x through U = the Winograd-transformed 3x3 weights (conv_winograd.h) into y
void conv_winograd(const ConvGeom& q, const float* px, const WinoWeights& w, const float* bias,
                   float* py, const Epilogue& ep) {
  const WinoGeom g(q);
  const int64_t units = q.N * g.bands, P = q.OH * q.OW;
  const int64_t floats = g.scratch_floats(q, w.ub != nullptr);
  parallel(q.N * q.O * P * q.C * 9, units, [&](int64_t task, int64_t ntask) {
    thread_local std::vector<float> scratch;
    if (scratch.size() < static_cast<size_t>(floats)) scratch.resize(floats);
    auto [t0, t1] = part(units, task, ntask, 1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g.bands, i0 = (t % g.bands) * g.bh, at = n * q.O * P;
      winograd_band(q, g, w, px + n * q.C * q.H * q.W, bias, py + at, i0,
                    std::min(g.bh, g.TH - i0), scratch.data(), ep, at);
    }
  });
}

// the geometry of a call of the winograd variant: x [N, C, H, W], U [16, O, C] (the bf16
// form: [16, O, 2 * ceil(C / 2)] bfloat16 bits), out [N, O, OH, OW] of a 3x3 kernel at
// stride 1, dilation 1, one group
template <bool kBf16>
ConvGeom winograd_geom(const char* op, const TensorView& x, const TensorView& u,
                       const tvm::ffi::Shape& params, const TensorView& out) {
  ConvGeom q{};
  read_params(op, params, q);
  if (q.sh != 1 || q.sw != 1 || q.dh != 1 || q.dw != 1 || q.G != 1)
    TVM_FFI_THROW(ValueError) << op << ": the Winograd form takes stride 1, dilation 1 and one "
                              << "group, found strides " << q.sh << "," << q.sw
                              << " dilation " << q.dh << "," << q.dw << " groups " << q.G;
  q.N = x.size(0), q.C = q.Cg = x.size(1), q.H = x.size(2), q.W = x.size(3);
  q.O = q.Og = u.size(1), q.KH = q.KW = 3;
  const int64_t depth = kBf16 ? (q.C + 1) / 2 * 2 : q.C;
  if (u.size(0) != 16 || u.size(2) != depth)
    TVM_FFI_THROW(ValueError) << op << ": the Winograd weight has shape " << shape_str(u)
                              << ", expected [16, O, " << depth << "] for x " << shape_str(x);
  q.OH = q.H + q.pt + q.pb - 2, q.OW = q.W + q.pl + q.pr - 2;
  if (q.OH <= 0 || q.OW <= 0)
    TVM_FFI_THROW(ValueError) << op << ": the 3x3 kernel is larger than the padded input of x "
                              << shape_str(x);
  if (out.size(0) != q.N || out.size(1) != q.O || out.size(2) != q.OH || out.size(3) != q.OW)
    TVM_FFI_THROW(ValueError) << op << ": out has shape " << shape_str(out) << ", expected ["
                              << q.N << ", " << q.O << ", " << q.OH << ", " << q.OW << "]";
  return q;
}

// a call's x, weight (named `what`, of rank `rank`) and out checked, its geometry made by
// `geom` (conv_geom, winograd_geom), and its bias checked against the output channels
template <typename Geom>
ConvGeom checked_call(const Call& c, const char* what, int rank, Geom geom,
                      DLDataType dtype = kFloat32) {
  TensorView x = c.in(0), w = c.in(1), out = c.out();
  check_tensor(c.op, "x", x, 4, 4);
  check_tensor(c.op, what, w, rank, rank, dtype);
  check_tensor(c.op, "out", out, 4, 4);
  const ConvGeom q = geom(c.op, x, w, c.params, out);
  if (c.bias != nullptr && c.nbias != q.O)
    TVM_FFI_THROW(ValueError) << c.op << ": bias has " << c.nbias << " values, out has " << q.O
                              << " channels";
  return q;
}

}  // namespace

void conv2d_run(const Call& c) {
  const ConvGeom q = checked_call(c, "weight", 4, conv_geom);
  if (q.N == 0 || q.O == 0) return;
  const float *px = fdata(c.in(0)), *pw = fdata(c.in(1));
  float* py = fdata_mut(c.out());
  if (q.Cg == 1) return conv_depthwise(q, px, pw, c.bias, py, c.ep);
  // the direct form computes 16 output columns at a time: narrow outputs (the 6x6 of a
  // 16x16-patch embedding) would waste most lanes, and go to im2col + GEMM instead
  const int64_t lanes = (q.OW + kNR - 1) / kNR * kNR;
  if (kHasAvx2 && 4 * q.OW >= 3 * lanes) return conv_direct(q, px, pw, c.bias, py, c.ep);
  conv_gemm(q, px, pw, c.bias, py, c.ep);
}

void conv2d_winograd_run(const Call& c) {
  const ConvGeom q = checked_call(c, "Winograd weight", 3, winograd_geom<false>);
  if (q.N == 0 || q.O == 0) return;
  conv_winograd(q, fdata(c.in(0)), WinoWeights{fdata(c.in(1))}, c.bias, fdata_mut(c.out()), c.ep);
}

void conv2d_winograd_bf16_run(const Call& c) {
  const ConvGeom q = checked_call(c, "Winograd weight", 3, winograd_geom<true>, kUint16);
  if (q.N == 0 || q.O == 0) return;
  const TensorView u = c.in(1);
  const auto* bits = reinterpret_cast<const uint16_t*>(static_cast<const char*>(u.data_ptr()) +
                                                       u.byte_offset());
  if (kHasAvx512Bf16) {
    WinoWeights w{nullptr, reinterpret_cast<const uint32_t*>(bits)};
    return conv_winograd(q, fdata(c.in(0)), w, c.bias, fdata_mut(c.out()), c.ep);
  }
  // elsewhere U unpacked to float32 and V rounded: the same values on the float32 path
  std::vector<float> uf(16 * q.O * q.C);
  const int64_t depth = u.size(2);
  for (int64_t r = 0; r < 16 * q.O; ++r)
    for (int64_t ch = 0; ch < q.C; ++ch) uf[r * q.C + ch] = from_bf16(bits[r * depth + ch]);
  conv_winograd(q, fdata(c.in(0)), WinoWeights{uf.data(), nullptr, true}, c.bias,
                fdata_mut(c.out()), c.ep);
}

}  // namespace mtc
