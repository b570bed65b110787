// densegrad/backend/cuda/conv.cuh: CUDA conv2d kernels (forward, grad input, grad weight, grad
// bias) for any stride, padding, dilation and groups. Three paths:
//   depthwise (groups == C_in == C_out), stride 1, 3x3/5x5/7x7 (RDNet's 7x7 pad 3): the taps in
//     registers, each thread a strip of output rows of one column, every input row loaded once
//     per strip; grad input is the same kernel with the taps transposed; grad weight keeps the
//     K*K sums per thread in registers and adds them per block in a fixed order. x is read in
//     place when batch-strided (a dense stage's prefix view).
//   other depthwise convs: tiled direct kernels, one block per output tile of one (image,
//     channel) plane with the input patch and the channel's taps staged in shared memory; grad
//     input is the same gather with the taps transposed; grad weight is a per-channel
//     reduction, deterministic (partial sums per block, then summed in a fixed order).
//   pointwise (1x1, stride 1, no padding): the image is its own column matrix, so forward and
//     grad input are strided-batched cuBLAS GEMMs straight on the tensors.
//   everything else (dense k x k, strided, grouped): im2col + cuBLAS GEMM, col2im for grad input.
//   Grad weight of both GEMM paths puts chunks of images side by side (one deep GEMM per chunk).
// bf16 products (Conv2dGeometry::bf16, set for float convs under dg::MatmulPrecision::bf16): the
// GEMM paths of ungrouped convs round their operands to bfloat16 where they are staged anyway (im2col, gathered
// images) or in one extra pass (weights, a pointwise conv's input, dout), and cuBLAS sums the
// exact products in float into float results. Depthwise convs, bias and col2im stay float.
// Maps of P % 8 != 0 positions (7x7) run those GEMMs on the wide layout (see odd_maps_go_wide).
// No atomics anywhere: every output element has one writer, so results are reproducible. Not
// cuDNN, not Winograd/FFT. Arithmetic in acc_t<T> (float for float, double for double).
// Shape legend: as in backend/ref/conv.hpp; K = Cg*kH*kW (one column of im2col), P = Ho*Wo.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "../ref/activation.hpp"  // gelu_scalar, gelu_grad_scalar (gelu_conv2d's bfloat16 input)
#include "../ref/conv.hpp"        // Conv2dGeometry
#include "common.cuh"
#include "matmul.cuh"

namespace dg::cuda {

namespace conv_detail {

/// Elements of scratch memory (im2col columns, gathered images) one GEMM conv may hold at once;
/// images are processed in chunks that fit. A variable so tests can force several chunks.
inline int64_t& workspace_limit() {
  static int64_t elems = int64_t(1) << 24;
  return elems;
}

/// Shared memory a tiled depthwise kernel may use per block (the default limit, no opt-in).
constexpr size_t kMaxSmem = 48 * 1024;

/// True for groups == C_in == C_out: each channel convolved with its own kH x kW filter.
inline bool is_depthwise(const Conv2dGeometry& g) { return g.groups == g.C_in && g.C_out == g.C_in; }
/// True when the image is its own im2col matrix (C_in, H*W): 1x1 kernel, stride 1, no padding.
inline bool is_pointwise(const Conv2dGeometry& g) {
  return g.kH == 1 && g.kW == 1 && g.sH == 1 && g.sW == 1 && g.pH == 0 && g.pW == 0;
}

/// Rows of one image's column matrix per group: C_in/groups * kH * kW (the GEMMs' K).
inline int64_t K_of(const Conv2dGeometry& g) { return g.cin_g() * g.kH * g.kW; }

/// floor(a / b) for b > 0 and any sign of a (C++ '/' truncates toward zero).
__host__ __device__ inline int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

/// The smallest power of two >= v (v >= 1), capped at cap.
inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

/// Runs f(I{}) with I = int when every index of a kernel stays below 2^30 (32-bit division is
/// several times cheaper on the GPU; the margin keeps grid-stride steps from overflowing), else
/// with I = int64_t.
template <class F>
void with_index_type(int64_t max_index, F&& f) {
  if (max_index < (int64_t(1) << 30)) f(int{});
  else f(int64_t{});
}

// ---------------------------------------------------------------- kernels: im2col / col2im / GEMM helpers

/// v as a GEMM operand of type U: itself, or rounded to the nearest bfloat16 (ties to even,
/// as the CPU's bf16 path and torch's .to(torch.bfloat16)).
template <class U, class T>
__device__ inline U to_operand(T v) {
  if constexpr (std::is_same_v<U, bf16_t>) return __float2bfloat16_rn(float(v));
  else return v;
}

/// Column matrix of gn images, one thread per element col[i]. Row r = (c*kH + kh)*kW + kw holds,
/// for every output position p, the input tap (kh, kw) of channel c sees there (0 in the padding).
/// narrow layout: (gn, C_in*kH*kW, P), each image's columns apart (the GEMM per image/group);
/// wide layout: (C_in*kH*kW, gn*P), the images side by side (one GEMM sums over all of them).
template <class T, class U, class I>
__global__ void im2col_kernel(const T* __restrict__ x, U* __restrict__ col, Conv2dGeometry g, I gn, bool wide,
                              I total) {
  const I P = I(g.Ho * g.Wo), R = I(g.C_in * g.kH * g.kW);
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total; i += I(gridDim.x) * I(blockDim.x)) {
    const I p = i % P, q = i / P;
    const I row = wide ? q / gn : q % R, n = wide ? q % gn : q / R;
    const I kw = row % I(g.kW), t = row / I(g.kW), kh = t % I(g.kH), c = t / I(g.kH);
    const I oh = p / I(g.Wo), ow = p - oh * I(g.Wo);
    const I ih = oh * I(g.sH) - I(g.pH) + kh * I(g.dH), iw = ow * I(g.sW) - I(g.pW) + kw * I(g.dW);
    col[i] = to_operand<U>((ih >= 0 && ih < I(g.H) && iw >= 0 && iw < I(g.W))
                               ? x[((n * I(g.C_in) + c) * I(g.H) + ih) * I(g.W) + iw]
                               : T(0));
  }
}

/// The adjoint of im2col (narrow layout), gather form: one thread per element of dx (gn, C_in,
/// H, W) sums the column entries copied from it, i.e. the taps (kh, kw) and output positions
/// (oh, ow) with oh*s - p + kh*d == ih (and likewise for w). Each dx element has one writer.
/// With wide, dcol is in the wide layout (C_in*kH*kW, gn*P) instead. With patch (kernel ==
/// stride, no padding, no dilation: RDNet's stem and transitions), each dx element was copied to
/// one column entry at most, found by one division per axis.
template <class T, class I>
__global__ void col2im_kernel(const T* __restrict__ dcol, T* __restrict__ dx, Conv2dGeometry g, I gn, bool wide,
                              bool patch, I total) {
  using A = acc_t<T>;
  const I taps = I(g.kH * g.kW);
  const I P = wide ? gn * I(g.Ho * g.Wo) : I(g.Ho * g.Wo);  // distance between two taps' rows
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total; i += I(gridDim.x) * I(blockDim.x)) {
    const I iw = i % I(g.W), q = i / I(g.W), ih = q % I(g.H), nc = q / I(g.H);  // nc = n*C_in + c
    const I c = nc % I(g.C_in), n = nc / I(g.C_in);
    const T* rows = wide ? dcol + c * taps * P + n * I(g.Ho * g.Wo) : dcol + nc * taps * P;
    if (patch) {
      const I oh = ih / I(g.sH), kh = ih - oh * I(g.sH), ow = iw / I(g.sW), kw = iw - ow * I(g.sW);
      dx[i] = oh < I(g.Ho) && ow < I(g.Wo) ? rows[(kh * I(g.kW) + kw) * P + oh * I(g.Wo) + ow] : T(0);
      continue;
    }
    A acc = A(0);
    for (I kh = 0; kh < I(g.kH); ++kh) {
      const I th = ih + I(g.pH) - kh * I(g.dH);
      if (th < 0 || th % I(g.sH) != 0) continue;
      const I oh = th / I(g.sH);
      if (oh >= I(g.Ho)) continue;
      for (I kw = 0; kw < I(g.kW); ++kw) {
        const I tw = iw + I(g.pW) - kw * I(g.dW);
        if (tw < 0 || tw % I(g.sW) != 0) continue;
        const I ow = tw / I(g.sW);
        if (ow >= I(g.Wo)) continue;
        acc += A(rows[(kh * I(g.kW) + kw) * P + oh * I(g.Wo) + ow]);
      }
    }
    dx[i] = T(acc);
  }
}

/// Four consecutive elements, moved as one access (16 bytes of float, 8 of bfloat16): the
/// staging kernels below take their elements by quads where the sizes and addresses allow, so
/// that each thread does its index arithmetic once per four elements and stores 8 or 16 bytes.
template <class V>
struct alignas(4 * sizeof(V)) Quad {
  V v[4];
};

/// True when p is aligned for Quad<V> accesses.
template <class V>
__host__ __device__ inline bool quad_aligned(const V* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Quad<V>) == 0;
}

/// How a staged operand reads its source element v (at index j of the source): as it is. The
/// quad form reads the four elements at 4*j4 .. 4*j4+3.
struct LoadAsIs {
  template <class V, class I>
  __device__ V operator()(V v, I) const { return v; }
  template <class V, class I>
  __device__ Quad<V> quad(Quad<V> q, I) const { return q; }
  bool quad_ok() const { return true; }
};

/// gelu_conv2d's forward staging under bf16 products: keeps h rounded to bfloat16 in hs (at
/// the element's own index) and yields the GELU of that rounded value.
struct KeepBf16Gelu {
  bf16_t* hs;
  bool tanh;
  template <class I>
  __device__ float operator()(float v, I j) const {
    const bf16_t r = __float2bfloat16_rn(v);
    hs[j] = r;
    return ref::gelu_scalar(__bfloat162float(r), tanh);
  }
  template <class I>
  __device__ Quad<float> quad(Quad<float> q, I j4) const {
    Quad<bf16_t> r;
    for (int k = 0; k < 4; ++k) {
      r.v[k] = __float2bfloat16_rn(q.v[k]);
      q.v[k] = ref::gelu_scalar(__bfloat162float(r.v[k]), tanh);
    }
    reinterpret_cast<Quad<bf16_t>*>(hs)[j4] = r;
    return q;
  }
  bool quad_ok() const { return quad_aligned(hs); }
};

/// gelu_conv2d's backward staging: the GELU of the kept bfloat16 input.
struct GeluOfBf16 {
  bool tanh;
  template <class I>
  __device__ float operator()(bf16_t v, I) const { return ref::gelu_scalar(__bfloat162float(v), tanh); }
  template <class I>
  __device__ Quad<float> quad(Quad<bf16_t> q, I) const {
    Quad<float> g;
    for (int k = 0; k < 4; ++k) g.v[k] = ref::gelu_scalar(__bfloat162float(q.v[k]), tanh);
    return g;
  }
  bool quad_ok() const { return true; }
};

/// Scattering a wide GEMM result (C, gn*P) back to images: the element plus its row's bias
/// (row j / row_len, read with stride bs); no bias when b is null.
template <class T>
struct AddBias {
  const T* b;
  int64_t bs;
  int64_t row_len;
  template <class I>
  __device__ T operator()(T v, I j) const { return b ? T(acc_t<T>(v) + acc_t<T>(b[(int64_t(j) / row_len) * bs])) : v; }
  template <class I>
  __device__ Quad<T> quad(Quad<T> q, I j4) const {
    if (b) {
      const acc_t<T> bc = acc_t<T>(b[(int64_t(j4) * 4 / row_len) * bs]);
      for (int k = 0; k < 4; ++k) q.v[k] = T(acc_t<T>(q.v[k]) + bc);
    }
    return q;
  }
  bool quad_ok() const { return row_len % 4 == 0; }
};

/// dst (R, gn*P) <- load(src (gn, R, P)): gn images' planes side by side (the wide layout), as
/// operands of type U (gn = 1: a plain copy).
template <class S, class U, class I, class Load>
__global__ void gather_wide_kernel(const S* __restrict__ src, U* __restrict__ dst, I R, I P, I gn, I total,
                                   Load load) {
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total; i += I(gridDim.x) * I(blockDim.x)) {
    const I p = i % P, q = i / P, n = q % gn, r = q / gn, j = (n * R + r) * P + p;
    dst[i] = to_operand<U>(load(src[j], j));
  }
}

/// gather_wide_kernel by quads: P4 = P/4 quads per plane, total4 quads in all; Wide false for a
/// plain copy (gn = 1: the source quad is the destination's own).
template <bool Wide, class S, class U, class I, class Load>
__global__ void gather_wide_quad_kernel(const Quad<S>* __restrict__ src, Quad<U>* __restrict__ dst, I R, I P4,
                                        I gn, I total4, Load load) {
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total4; i += I(gridDim.x) * I(blockDim.x)) {
    I j = i;
    if constexpr (Wide) {
      const I p = i % P4, q = i / P4, n = q % gn, r = q / gn;
      j = (n * R + r) * P4 + p;
    }
    const auto v = load.quad(src[j], j);
    Quad<U> o;
    for (int k = 0; k < 4; ++k) o.v[k] = to_operand<U>(v.v[k]);
    dst[i] = o;
  }
}

/// dg[i] *= gelu'(hs[i]): gelu_conv2d's input gradient from its bfloat16 input, in place, by
/// quads (total4 of them).
template <class I>
__global__ void gelu_grad_bf16_kernel(Quad<float>* __restrict__ dg, const Quad<bf16_t>* __restrict__ hs, I total4,
                                      bool tanh) {
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total4; i += I(gridDim.x) * I(blockDim.x)) {
    Quad<float> d = dg[i];
    const Quad<bf16_t> h = hs[i];
    for (int k = 0; k < 4; ++k) d.v[k] *= ref::gelu_grad_scalar(__bfloat162float(h.v[k]), tanh);
    dg[i] = d;
  }
}

/// The same one element at a time (sizes that are no multiple of 4, unaligned tensors).
template <class I>
__global__ void gelu_grad_bf16_scalar_kernel(float* __restrict__ dg, const bf16_t* __restrict__ hs, I total,
                                             bool tanh) {
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total; i += I(gridDim.x) * I(blockDim.x))
    dg[i] = dg[i] * ref::gelu_grad_scalar(__bfloat162float(hs[i]), tanh);
}

/// y[n, c, p] += bias[c]; y: (N, C, P) contiguous, bias read with stride bs.
template <class T, class I>
__global__ void add_bias_kernel(T* __restrict__ y, const T* __restrict__ b, int64_t bs, I C, I P, I total) {
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total; i += I(gridDim.x) * I(blockDim.x))
    y[i] = T(acc_t<T>(y[i]) + acc_t<T>(b[((i / P) % C) * bs]));
}

/// add_bias_kernel by quads: P4 = P/4 quads per plane, total4 in all.
template <class T, class I>
__global__ void add_bias_quad_kernel(Quad<T>* __restrict__ y, const T* __restrict__ b, int64_t bs, I C, I P4,
                                     I total4) {
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < total4; i += I(gridDim.x) * I(blockDim.x)) {
    const acc_t<T> bc = acc_t<T>(b[((i / P4) % C) * bs]);
    Quad<T> q = y[i];
    for (int k = 0; k < 4; ++k) q.v[k] = T(acc_t<T>(q.v[k]) + bc);
    y[i] = q;
  }
}

/// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); valid in thread 0.
/// Fixed shuffle tree and warp order: the same inputs give the same bits.
template <class A>
__device__ A block_sum(A v, A* warp_part) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? warp_part[lane] : A(0);
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

/// dbias, stage 1: block (chunk k, channel c) sums dout[n, c, :] over the images [k*per,
/// (k+1)*per) into part[k*C + c]. The block's threads walk the chunk's planes as one range of
/// positions (planes of few positions keep every thread busy), by quads when each plane starts on
/// a quad boundary, several loads in flight per thread. Fixed order: the same bits every run.
template <class T, class I>
__global__ void bias_grad_kernel(const T* __restrict__ dout, T* __restrict__ part, I N, I C, I P, I chunks, I per,
                                 bool quads) {
  using A = acc_t<T>;
  __shared__ A warp_part[32];
  const I k = I(blockIdx.x) % chunks, c = I(blockIdx.x) / chunks;
  const I n0 = k * per, images = min(N, n0 + per) - n0;
  const T* first = dout + (n0 * C + c) * P;  // plane (n0, c); the next image's is C*P further
  A acc = A(0);
  if (quads) {
    const I P4 = P / 4, total = images * P4;
#pragma unroll 4
    for (I t = I(threadIdx.x); t < total; t += I(blockDim.x)) {
      const I n = t / P4, p = t - n * P4;
      const Quad<T> q = reinterpret_cast<const Quad<T>*>(first + n * C * P)[p];
      acc += (A(q.v[0]) + A(q.v[1])) + (A(q.v[2]) + A(q.v[3]));
    }
  } else {
    const I total = images * P;
#pragma unroll 4
    for (I t = I(threadIdx.x); t < total; t += I(blockDim.x)) {
      const I n = t / P, p = t - n * P;
      acc += A(first[n * C * P + p]);
    }
  }
  acc = block_sum(acc, warp_part);
  if (threadIdx.x == 0) part[k * C + c] = T(acc);
}

// ---------------------------------------------------------------- kernels: depthwise, tiled direct
// Blocks are numbered (plane, tile row, tile column) with plane = n*C + c in one grid dimension
// (x, up to 2^31 - 1 blocks). Shared memory holds the channel's kH*kW taps first, then the
// staged patch; both of type T, so the patch is aligned too. Planes hold fewer than 2^31
// elements (checked on the host), so in-plane indices are int.

extern __shared__ __align__(16) unsigned char conv_smem[];

/// Sizes of one depthwise launch, passed by value.
struct DwParams {
  int C, H, W, Ho, Wo, kH, kW, sH, sW, pH, pW, dH, dW;
  int tiles_h, tiles_w;  // tiles per plane
  int patch_h, patch_w;  // the staged patch
};

/// Forward: block (by, bx) computes a by x bx tile of y[n, c]. The input patch it reads,
/// ((by-1)*sH + (kH-1)*dH + 1) x ((bx-1)*sW + (kW-1)*dW + 1) with zeros for the padding, is
/// staged once; each thread then sums its kH*kW taps from shared memory (bias first, then the
/// taps in (kh, kw) order, as the ref kernel).
template <class T>
__global__ void depthwise_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                         int64_t bs, T* __restrict__ y, DwParams d) {
  using A = acc_t<T>;
  T* s_w = reinterpret_cast<T*>(conv_smem);
  T* s_x = s_w + d.kH * d.kW;
  const int64_t blk = blockIdx.x;
  const int tw = static_cast<int>(blk % d.tiles_w);
  const int th = static_cast<int>((blk / d.tiles_w) % d.tiles_h);
  const int64_t plane = blk / (int64_t(d.tiles_w) * d.tiles_h);
  const int c = static_cast<int>(plane % d.C);
  const int oh0 = th * blockDim.y, ow0 = tw * blockDim.x;
  const int ih0 = oh0 * d.sH - d.pH, iw0 = ow0 * d.sW - d.pW;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  const T* xp = x + plane * d.H * d.W;
  for (int i = tid; i < d.kH * d.kW; i += nt) s_w[i] = w[c * d.kH * d.kW + i];
  for (int i = tid; i < d.patch_h * d.patch_w; i += nt) {
    const int r = i / d.patch_w, ih = ih0 + r, iw = iw0 + (i - r * d.patch_w);
    s_x[i] = (ih >= 0 && ih < d.H && iw >= 0 && iw < d.W) ? xp[ih * d.W + iw] : T(0);
  }
  __syncthreads();
  const int oh = oh0 + threadIdx.y, ow = ow0 + threadIdx.x;
  if (oh >= d.Ho || ow >= d.Wo) return;
  A acc = b ? A(b[c * bs]) : A(0);
  const T* sx = s_x + threadIdx.y * d.sH * d.patch_w + threadIdx.x * d.sW;  // tap (0, 0) of this output
  for (int kh = 0; kh < d.kH; ++kh) {
    const T* xr = sx + kh * d.dH * d.patch_w;
    const T* wr = s_w + kh * d.kW;
    for (int kw = 0; kw < d.kW; ++kw) acc += A(wr[kw]) * A(xr[kw * d.dW]);
  }
  y[plane * d.Ho * d.Wo + oh * d.Wo + ow] = T(acc);
}

/// Grad input, gather form: block (by, bx) computes a by x bx tile of dx[n, c]. Input row ih
/// received dout row oh through tap kh when oh*sH - pH + kh*dH == ih, so it gathers
/// dout[(ih + pH - kh*dH) / sH] for the taps where that division is exact. The dout rows the
/// tile needs start at oh_base = floor((ih0 + pH - (kH-1)*dH) / sH) and span at most
/// patch_h = (by - 1 + (kH-1)*dH) / sH + 2 rows (likewise columns); they are staged with zeros
/// outside the plane, so the sum needs no bounds checks, only the divisibility test (none for
/// kUnit, stride 1 both ways, where every tap contributes).
template <class T, bool kUnit>
__global__ void depthwise_backward_input_kernel(const T* __restrict__ dout, const T* __restrict__ w,
                                                T* __restrict__ dx, DwParams d) {
  using A = acc_t<T>;
  T* s_w = reinterpret_cast<T*>(conv_smem);
  T* s_d = s_w + d.kH * d.kW;
  const int64_t blk = blockIdx.x;
  const int tw = static_cast<int>(blk % d.tiles_w);
  const int th = static_cast<int>((blk / d.tiles_w) % d.tiles_h);
  const int64_t plane = blk / (int64_t(d.tiles_w) * d.tiles_h);
  const int c = static_cast<int>(plane % d.C);
  const int ih0 = th * blockDim.y, iw0 = tw * blockDim.x;
  const int oh_base = floor_div(ih0 + d.pH - (d.kH - 1) * d.dH, d.sH);
  const int ow_base = floor_div(iw0 + d.pW - (d.kW - 1) * d.dW, d.sW);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  const T* dp = dout + plane * d.Ho * d.Wo;
  for (int i = tid; i < d.kH * d.kW; i += nt) s_w[i] = w[c * d.kH * d.kW + i];
  for (int i = tid; i < d.patch_h * d.patch_w; i += nt) {
    const int r = i / d.patch_w, oh = oh_base + r, ow = ow_base + (i - r * d.patch_w);
    s_d[i] = (oh >= 0 && oh < d.Ho && ow >= 0 && ow < d.Wo) ? dp[oh * d.Wo + ow] : T(0);
  }
  __syncthreads();
  const int ih = ih0 + threadIdx.y, iw = iw0 + threadIdx.x;
  if (ih >= d.H || iw >= d.W) return;
  A acc = A(0);
  for (int kh = 0; kh < d.kH; ++kh) {
    const int u = ih + d.pH - kh * d.dH - oh_base * d.sH;  // >= 0 by the choice of oh_base
    if (!kUnit && u % d.sH != 0) continue;
    const T* dr = s_d + (kUnit ? u : u / d.sH) * d.patch_w;
    for (int kw = 0; kw < d.kW; ++kw) {
      const int v = iw + d.pW - kw * d.dW - ow_base * d.sW;
      if (!kUnit && v % d.sW != 0) continue;
      acc += A(s_w[kh * d.kW + kw]) * A(dr[kUnit ? v : v / d.sW]);
    }
  }
  dx[plane * d.H * d.W + ih * d.W + iw] = T(acc);
}

/// Grad weight, stage 1: block (chunk k, channel c) sums, for every tap of channel c, dout * x
/// over the images [n_lo, n_hi) of chunk k, into part[(k*C + c)*taps + tap]. Output tiles of
/// tile_h x tile_w positions are staged (dout tile and the input patch under it); thread tid
/// owns tap tid % taps and every lanes-th position of the tile, keeping one running sum in a
/// register; at the end the lanes of each tap are added in lane order. Taps beyond the block
/// size are done in further passes of tap groups.
template <class T>
__global__ void depthwise_backward_weight_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                                                 T* __restrict__ part, DwParams d, int N, int chunks,
                                                 int per, int tile_h, int tile_w) {
  using A = acc_t<T>;
  T* s_d = reinterpret_cast<T*>(conv_smem);
  T* s_x = s_d + tile_h * tile_w;
  A* s_red = reinterpret_cast<A*>(s_x + d.patch_h * d.patch_w);  // T == A: alignment holds
  const int k = blockIdx.x % chunks, c = blockIdx.x / chunks;
  const int n_lo = k * per, n_hi = min(N, n_lo + per);
  const int taps = d.kH * d.kW, tid = threadIdx.x, nt = blockDim.x;
  for (int g0 = 0; g0 < taps; g0 += nt) {
    const int taps_g = min(taps - g0, nt), lanes = nt / taps_g;
    const bool active = tid < lanes * taps_g;
    const int tap = g0 + tid % taps_g, lane = tid / taps_g;
    const int kh = tap / d.kW, kw = tap - kh * d.kW;
    const int tap_off = kh * d.dH * d.patch_w + kw * d.dW;  // tap's offset in the patch
    A acc = A(0);
    for (int n = n_lo; n < n_hi; ++n) {
      const int64_t plane = int64_t(n) * d.C + c;
      const T* dp = dout + plane * d.Ho * d.Wo;
      const T* xp = x + plane * d.H * d.W;
      for (int oh0 = 0; oh0 < d.Ho; oh0 += tile_h)
        for (int ow0 = 0; ow0 < d.Wo; ow0 += tile_w) {
          const int th = min(tile_h, d.Ho - oh0), tw = min(tile_w, d.Wo - ow0), npos = th * tw;
          const int ih0 = oh0 * d.sH - d.pH, iw0 = ow0 * d.sW - d.pW;
          __syncthreads();  // the previous tile is no longer read
          for (int i = tid; i < npos; i += nt) {
            const int r = i / tw;
            s_d[i] = dp[(oh0 + r) * d.Wo + ow0 + (i - r * tw)];
          }
          for (int i = tid; i < d.patch_h * d.patch_w; i += nt) {
            const int r = i / d.patch_w, ih = ih0 + r, iw = iw0 + (i - r * d.patch_w);
            s_x[i] = (ih >= 0 && ih < d.H && iw >= 0 && iw < d.W) ? xp[ih * d.W + iw] : T(0);
          }
          __syncthreads();
          if (active)
            for (int pos = lane; pos < npos; pos += lanes) {
              const int r = pos / tw, q = pos - r * tw;
              acc += A(s_d[pos]) * A(s_x[r * d.sH * d.patch_w + q * d.sW + tap_off]);
            }
        }
    }
    s_red[tid] = acc;  // inactive threads hold 0 and are never read
    __syncthreads();
    if (tid < taps_g) {
      A s = A(0);
      for (int l = 0; l < lanes; ++l) s += s_red[l * taps_g + tid];
      part[(int64_t(k) * d.C + c) * taps + g0 + tid] = T(s);
    }
    __syncthreads();  // s_red is reused by the next tap group
  }
}

// ---------------------------------------------------------------- kernels: depthwise, stride 1, K x K taps
// The common case (RDNet's 7x7 pad 3) with the taps in registers: thread (plane, column ow, strip of
// kStrip output rows) slides down the kStrip + K - 1 input rows under its strip, loads each row's K
// values once and adds them into every output of the strip that uses that row. Per output that is
// (kStrip + K - 1) * K / kStrip loads (13 for 7x7) instead of 2 * K * K shared-memory reads, and
// consecutive threads read consecutive columns (coalesced, no shared memory, no barriers).
// Sums run bias first, then the taps in (kh, kw) order, as the ref kernel. Images may lie any
// distance apart (x_sn): a dense stage's prefix view is read in place.

/// Output rows one thread computes (56, 28, 14 and 7, RDNet's sizes, are multiples of it).
constexpr int kStrip = 7;

/// The walk both stride-1 kernels share: for the output rows oh0 .. oh0 + kStrip - 1 of column ow,
/// loads each of the kStrip + K - 1 input rows under them once (xr[kw] = xp[ih, ow - pW + kw], 0
/// outside the plane) and calls f(j, kh, xr) for every strip row j that input row feeds through
/// tap row kh: per output row, kh rises, so sums follow the ref kernel's (kh, kw) order.
template <class A, int K, class T, class F>
__device__ __forceinline__ void for_each_strip_row(const T* __restrict__ xp, int H, int W, int oh0, int ow, int pH,
                                                   int pW, F&& f) {
#pragma unroll
  for (int t = 0; t < kStrip + K - 1; ++t) {  // input row oh0 - pH + t feeds output row oh0 + t - kh
    const int ih = oh0 - pH + t;
    if (ih < 0 || ih >= H) continue;
    const T* row = xp + int64_t(ih) * W;
    A xr[K];
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int iw = ow - pW + kw;
      xr[kw] = (iw >= 0 && iw < W) ? A(row[iw]) : A(0);
    }
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int j = t - kh;
      if (j >= 0 && j < kStrip) f(j, kh, xr);
    }
  }
}

/// y[n, c, oh, ow] = b[c] + sum over (kh, kw) of w[c, kh, kw] * x[n, c, oh - pH + kh, ow - pW + kw]
/// (zero outside the image), for a strip of kStrip rows oh. With kFlip, the taps are read
/// transposed, w[c, K-1-kh, K-1-kw]: then the kernel computes a stride-1 conv's grad input from
/// its dout (input dout, output dx, padding K - 1 - pH, which may be negative).
/// I indexes the (plane, strip, column) items: int where there are fewer than 2^31 (3 divisions
/// of 32 bits per thread instead of 64).
template <class T, int K, bool kFlip, class I>
__global__ void depthwise_s1_kernel(const T* __restrict__ x, int64_t x_sn, const T* __restrict__ w,
                                    const T* __restrict__ b, int64_t bs, T* __restrict__ y, int C, int H, int W,
                                    int Ho, int Wo, int pH, int pW, int strips, I total) {
  using A = acc_t<T>;
  const I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  if (i >= total) return;
  const I rest = i / I(Wo), items = rest / I(strips);  // items: the plane n * C + c
  const int ow = int(i - rest * I(Wo));
  const int strip = int(rest - items * I(strips));
  const int64_t plane = int64_t(items);
  const int c = int(plane % C);
  const int64_t n = plane / C;
  const T* xp = x + n * x_sn + int64_t(c) * H * W;
  A wr[K][K];
#pragma unroll
  for (int kh = 0; kh < K; ++kh)
#pragma unroll
    for (int kw = 0; kw < K; ++kw)
      wr[kh][kw] = A(w[int64_t(c) * K * K + (kFlip ? (K - 1 - kh) * K + (K - 1 - kw) : kh * K + kw)]);
  const int oh0 = strip * kStrip;
  const A bias = b ? A(b[c * bs]) : A(0);
  A acc[kStrip];
#pragma unroll
  for (int j = 0; j < kStrip; ++j) acc[j] = bias;
  for_each_strip_row<A, K>(xp, H, W, oh0, ow, pH, pW, [&](int j, int kh, const A* xr) {
#pragma unroll
    for (int kw = 0; kw < K; ++kw) acc[j] += wr[kh][kw] * xr[kw];
  });
  T* yp = y + plane * Ho * Wo + ow;
#pragma unroll
  for (int j = 0; j < kStrip; ++j)
    if (oh0 + j < Ho) yp[int64_t(oh0 + j) * Wo] = T(acc[j]);
}

/// Grad weight of a stride-1 K x K depthwise conv, stage 1: block (chunk k, channel c) sums
/// dout[n, c, oh, ow] * x[n, c, oh - pH + kh, ow - pW + kw] over the images [k*per, (k+1)*per)
/// into part[(k*C + c)*K*K + kh*K + kw]. Each thread walks (image, strip, column) items, keeps
/// the K*K sums in registers (the strip's dout values in registers too, each input row loaded
/// once), then the block adds the threads' sums in a fixed order: deterministic.
template <class T, int K>
__global__ void depthwise_s1_weight_kernel(const T* __restrict__ dout, const T* __restrict__ x, int64_t x_sn,
                                           T* __restrict__ part, int C, int H, int W, int Ho, int Wo, int pH,
                                           int pW, int strips, int N, int per, int chunks) {
  using A = acc_t<T>;
  __shared__ A warp_part[K * K][32];
  const int k = blockIdx.x % chunks, c = blockIdx.x / chunks;
  const int n_lo = k * per, n_hi = min(N, n_lo + per);
  A acc[K][K];
#pragma unroll
  for (int kh = 0; kh < K; ++kh)
#pragma unroll
    for (int kw = 0; kw < K; ++kw) acc[kh][kw] = A(0);
  // the block's (image, strip, column) items, indexed in 32 bits where they fit
  const int64_t items = int64_t(n_hi - n_lo) * strips * Wo;
  const bool narrow_index = items < INT_MAX - int64_t(blockDim.x);
  for (int64_t it = threadIdx.x; it < items; it += blockDim.x) {
    int ow, strip;
    int64_t n;
    if (narrow_index) {
      const int i32 = int(it), rest = i32 / Wo, img = rest / strips;
      ow = i32 - rest * Wo, strip = rest - img * strips, n = n_lo + img;
    } else {
      const int64_t rest = it / Wo;
      ow = int(it % Wo), strip = int(rest % strips), n = n_lo + rest / strips;
    }
    const T* dp = dout + (n * C + c) * int64_t(Ho) * Wo + ow;
    const T* xp = x + n * x_sn + int64_t(c) * H * W;
    const int oh0 = strip * kStrip;
    A dv[kStrip];
#pragma unroll
    for (int j = 0; j < kStrip; ++j) dv[j] = oh0 + j < Ho ? A(dp[int64_t(oh0 + j) * Wo]) : A(0);
    for_each_strip_row<A, K>(xp, H, W, oh0, ow, pH, pW, [&](int j, int kh, const A* xr) {
#pragma unroll
      for (int kw = 0; kw < K; ++kw) acc[kh][kw] += dv[j] * xr[kw];
    });
  }
  // Each tap's sum over the block: a fixed shuffle tree per warp, then the warps in order.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
#pragma unroll
  for (int kh = 0; kh < K; ++kh)
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      A v = acc[kh][kw];
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) warp_part[kh * K + kw][warp] = v;
    }
  __syncthreads();
  for (int tap = threadIdx.x; tap < K * K; tap += blockDim.x) {
    A s = A(0);
    for (int q = 0; q < nwarps; ++q) s += warp_part[tap][q];
    part[(int64_t(k) * C + c) * K * K + tap] = T(s);
  }
}

/// Stage 2 of the reductions split over image chunks (grad weight of depthwise convs, grad
/// bias): out[i] = sum over chunks k, in order, of part[k*n + i].
template <class T>
__global__ void sum_chunks_kernel(const T* __restrict__ part, T* __restrict__ out, int64_t n, int chunks) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t<T> s = 0;
    for (int k = 0; k < chunks; ++k) s += acc_t<T>(part[k * n + i]);
    out[i] = T(s);
  }
}

// ---------------------------------------------------------------- launchers: shared pieces

/// Checks what every conv entry point trusts: CUDA tensors on one device, contiguous, with the
/// geometry's shapes. Returns the device.
/// A tensor named as `batch_strided` may also be batch-strided (dg::batch_stride: images any distance
/// apart, each dense), as a dense stage's prefix view is.
template <class T>
Device check_inputs(const char* op, std::initializer_list<std::pair<const Tensor<T>*, Shape>> ts,
                    const Tensor<T>* batch_strided = nullptr) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "CUDA conv2d: float and double only");
  const Device dev = ts.begin()->first->device();
  DG_CHECK(dev.is_cuda(), op, ": expected CUDA tensors, got one on ", dev.str());
  for (const auto& [t, shape] : ts) {
    if (!t->defined()) continue;
    DG_CHECK(t->device() == dev, op, ": expected all tensors on ", dev.str(), ", got one on ", t->device().str());
    DG_CHECK(t->shape() == shape, op, ": expected a tensor of shape ", shape_str(shape), " for this geometry, got ",
             shape_str(t->shape()));
    DG_CHECK(t->is_contiguous() || t->dim() == 1 || (t == batch_strided && batch_stride(*t) >= 0), op,
             ": the CUDA kernel expects contiguous tensors", t == batch_strided ? " (or batch-strided)" : "",
             ", got strides ", shape_str(t->strides()), " for shape ", shape_str(t->shape()));
  }
  return dev;
}

/// Splits N >= 1 images into chunks of `units` blocks each, so that about 4 blocks per
/// multiprocessor run; sets per (images per chunk) and returns the number of chunks, none empty.
inline int64_t image_chunks(int64_t units, int64_t N, int64_t& per) {
  const int64_t want = std::clamp<int64_t>((4 * int64_t(sm_count()) + units - 1) / units, 1, N);
  per = (N + want - 1) / want;
  return (N + per - 1) / per;
}

/// Sets n elements at p to zero (0.0 is all-zero bytes for float and double).
template <class T>
void zero(T* p, int64_t n) {
  if (n > 0) DG_CUDA_CHECK(cudaMemsetAsync(p, 0, static_cast<size_t>(n) * sizeof(T), stream()));
}

/// im2col of gn images starting at x (their first element), into col (narrow or wide layout).
template <class T, class U>
void im2col(const T* x, U* col, const Conv2dGeometry& g, int64_t gn, bool wide) {
  const int64_t total = gn * g.C_in * g.kH * g.kW * g.Ho * g.Wo;
  with_index_type(std::max(total, gn * g.C_in * g.H * g.W), [&](auto zero_i) {
    using I = decltype(zero_i);
    im2col_kernel<T, U, I><<<blocks_for(total), kThreads, 0, stream()>>>(x, col, g, I(gn), wide, I(total));
  });
  check_launch("conv2d (im2col)");
}

/// dst (R, gn*P) from gn images src (gn, R, P), each element through load; with gn = 1 a copy
/// (a conversion when U != S).
/// Runs by quads when the planes (the whole copy for gn = 1) are a multiple of 4 elements and
/// every pointer is aligned for them.
template <class S, class U, class Load = LoadAsIs>
void gather_wide(const S* src, U* dst, int64_t R, int64_t P, int64_t gn, Load load = {}) {
  const int64_t total = gn * R * P;
  if (total == 0) return;
  const bool wide = gn > 1;
  const bool quads = sizeof(S) <= 4 && sizeof(U) <= 4 && (wide ? P : total) % 4 == 0 && quad_aligned(src) &&
                     quad_aligned(dst) && load.quad_ok();
  with_index_type(total, [&](auto zero_i) {
    using I = decltype(zero_i);
    if (!quads) {
      gather_wide_kernel<S, U, I, Load>
          <<<blocks_for(total), kThreads, 0, stream()>>>(src, dst, I(R), I(P), I(gn), I(total), load);
      return;
    }
    const auto* s4 = reinterpret_cast<const Quad<S>*>(src);
    auto* d4 = reinterpret_cast<Quad<U>*>(dst);
    const I total4 = I(total / 4);
    if (wide)
      gather_wide_quad_kernel<true, S, U, I, Load>
          <<<blocks_for(total4), kThreads, 0, stream()>>>(s4, d4, I(R), I(P / 4), I(gn), total4, load);
    else
      gather_wide_quad_kernel<false, S, U, I, Load>
          <<<blocks_for(total4), kThreads, 0, stream()>>>(s4, d4, I(1), total4, I(1), total4, load);
  });
  check_launch("conv2d (gather images)");
}

/// Scratch memory for n GEMM operands of type U, held by a float/double tensor on dev (so the
/// caching allocator serves it like any other tensor); empty when n == 0.
template <class T, class U>
struct Scratch {
  Tensor<T> storage;
  U* p = nullptr;
  Scratch() = default;
  Scratch(int64_t n, Device dev) {
    if (n <= 0) return;
    const int64_t elems = (n * int64_t(sizeof(U)) + int64_t(sizeof(T)) - 1) / int64_t(sizeof(T));
    storage = empty<T>({elems}, dev);
    p = reinterpret_cast<U*>(storage.data());
  }
};

/// Calls f(U{}) with U the GEMM operand type of g: bf16_t when g asks for bf16 products, T is
/// float and the conv is ungrouped (as on the CPU), else T itself.
template <class T, class F>
void with_operand_type(const Conv2dGeometry& g, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (g.bf16 && g.groups == 1) {
      f(bf16_t{});
      return;
    }
  }
  f(T{});
}

/// The weight (contiguous, n elements) as GEMM operands: itself, or a bf16 copy kept in s.
template <class T, class U>
const U* weight_operand(const T* w, int64_t n, Scratch<T, U>& s, Device dev) {
  if constexpr (std::is_same_v<U, T>) {
    return w;
  } else {
    s = Scratch<T, U>(n, dev);
    gather_wide(w, s.p, 1, n, 1);
    return s.p;
  }
}

/// Y[n][gi] (OCg, P) = W[gi] (OCg, K) @ col[n][gi] (K, P) for gn images and every group: col's
/// image stride is col_img (its groups K*P apart), y's C_out*P (groups OCg*P apart). One
/// strided-batched GEMM per image over the groups, or per group over the images, whichever
/// makes fewer calls (a stride-0 batch reuses the group's weight for every image).
template <class T, class U>
void gemm_conv_forward(const U* w, const U* col, int64_t col_img, T* y, const Conv2dGeometry& g, int64_t gn) {
  const int64_t OCg = g.cout_g(), K = g.cin_g() * g.kH * g.kW, P = g.Ho * g.Wo;
  if (gn <= g.groups) {
    for (int64_t i = 0; i < gn; ++i)
      gemm<T, U>(false, false, OCg, P, K, T(1), w, K, OCg * K, col + i * col_img, P, K * P, T(0),
                 y + i * g.C_out * P, P, OCg * P, g.groups);
  } else {
    for (int64_t gi = 0; gi < g.groups; ++gi)
      gemm<T, U>(false, false, OCg, P, K, T(1), w + gi * OCg * K, K, 0, col + gi * K * P, P, col_img, T(0),
                 y + gi * OCg * P, P, g.C_out * P, gn);
  }
}

/// dcol[n][gi] (K, P) = W[gi]^T (K, OCg) @ dout[n][gi] (OCg, P), batched as above.
template <class T, class U>
void gemm_conv_backward_input(const U* w, const U* dy, T* dcol, int64_t col_img, const Conv2dGeometry& g,
                              int64_t gn) {
  const int64_t OCg = g.cout_g(), K = g.cin_g() * g.kH * g.kW, P = g.Ho * g.Wo;
  if (gn <= g.groups) {
    for (int64_t i = 0; i < gn; ++i)
      gemm<T, U>(true, false, K, P, OCg, T(1), w, K, OCg * K, dy + i * g.C_out * P, P, OCg * P, T(0),
                 dcol + i * col_img, P, K * P, g.groups);
  } else {
    for (int64_t gi = 0; gi < g.groups; ++gi)
      gemm<T, U>(true, false, K, P, OCg, T(1), w + gi * OCg * K, K, 0, dy + gi * OCg * P, P, g.C_out * P, T(0),
                 dcol + gi * K * P, P, col_img, gn);
  }
}

/// Images per chunk of a GEMM path: all N when nothing is staged, else as many as fit the
/// workspace at `staged` scratch elements per image (at least one).
inline int64_t chunk_images(const Conv2dGeometry& g, int64_t staged) {
  return staged == 0 ? g.N : std::clamp<int64_t>(workspace_limit() / std::max<int64_t>(staged, 1), 1, g.N);
}

/// Maps whose positions are no multiple of 8 (RDNet's last stage: 7x7 = 49) give bf16 GEMM
/// operands rows of odd length per image, for which cuBLAS falls back to slow kernels for
/// unaligned operands. The forward and input-gradient GEMMs of such an ungrouped conv with bf16
/// products therefore run on the wide layout instead, one GEMM over rows of gn*P, in chunks of
/// a multiple of 8 images (where there are 8 images or more); the result is then scattered to
/// the images. The operands are staged anyway, so this costs one float pass (the scatter).
inline bool odd_maps_go_wide(const Conv2dGeometry& g, bool round) {
  return round && g.groups == 1 && (g.Ho * g.Wo) % 8 != 0;
}
/// The chunk size for wide: a multiple of 8 images when G >= 8.
inline int64_t wide_chunk_images(int64_t G) { return G >= 8 ? G - G % 8 : G; }
/// Whether a chunk of gn images takes the wide GEMM: rows of gn*P bf16 operands, a multiple of 8.
inline bool chunk_goes_wide(bool wide, const Conv2dGeometry& g, int64_t gn) {
  return wide && (gn * g.Ho * g.Wo) % 8 == 0;
}

/// y (gn images) = W (C_out, K) @ cols + b (read with stride bs; none when null), cols in the
/// wide layout (K, gn*P): one GEMM into yw (C_out, gn*P), then scattered to the images with the
/// bias added. Ungrouped convs only.
template <class T, class U>
void gemm_conv_forward_wide(const U* w, const U* cols, T* yw, T* y, const T* b, int64_t bs, const Conv2dGeometry& g,
                            int64_t gn) {
  const int64_t K = K_of(g), P = g.Ho * g.Wo, GP = gn * P;
  gemm<T, U>(false, false, g.C_out, GP, K, T(1), w, K, 0, cols, GP, 0, T(0), yw, GP, 0, 1);
  gather_wide(yw, y, gn, P, g.C_out, AddBias<T>{b, bs, GP});  // (C_out, gn, P) -> (gn, C_out, P)
}

// ---------------------------------------------------------------- launchers: GEMM path

/// y (N, C, P) += b (read with stride bs) per channel; nothing when b is null.
template <class T>
void add_bias(T* y, const T* b, int64_t bs, int64_t N, int64_t C, int64_t P) {
  if (!b) return;
  const int64_t total = N * C * P;
  if (total == 0) return;
  const bool quads = sizeof(T) <= 4 && P % 4 == 0 && quad_aligned(y);
  with_index_type(total, [&](auto zero_i) {
    using I = decltype(zero_i);
    if (quads)
      add_bias_quad_kernel<T, I><<<blocks_for(total / 4), kThreads, 0, stream()>>>(
          reinterpret_cast<Quad<T>*>(y), b, bs, I(C), I(P / 4), I(total / 4));
    else
      add_bias_kernel<T, I><<<blocks_for(total), kThreads, 0, stream()>>>(y, b, bs, I(C), I(P), I(total));
  });
  check_launch("conv2d (bias)");
}

/// y = conv(x, w) + b by (im2col +) GEMM, in chunks of images whose columns fit the workspace.
/// A pointwise conv multiplies the images in place, unless their operands must be rounded.
template <class T>
void gemm_path_forward(const T* x, const T* w, const T* b, int64_t bs, T* y, const Conv2dGeometry& g, Device dev) {
  const int64_t P = g.Ho * g.Wo, col_img = g.C_in * g.kH * g.kW * P, y_img = g.C_out * P;
  with_operand_type<T>(g, [&](auto zero_u) {
    using U = decltype(zero_u);
    const bool in_place = is_pointwise(g) && std::is_same_v<U, T>;  // the images are the columns: no copy
    const bool wide = odd_maps_go_wide(g, !std::is_same_v<U, T>);
    int64_t G = chunk_images(g, in_place ? 0 : col_img + (wide ? y_img : 0));
    if (wide) G = wide_chunk_images(G);
    Scratch<T, U> wbuf, col(in_place ? 0 : G * col_img, dev);
    Scratch<T, T> yw(wide ? G * y_img : 0, dev);
    const U* wu = weight_operand(w, g.C_out * K_of(g), wbuf, dev);
    for (int64_t n0 = 0; n0 < g.N; n0 += G) {
      const int64_t gn = std::min(G, g.N - n0);
      const T* xc = x + n0 * g.C_in * g.H * g.W;
      T* yc = y + n0 * y_img;
      if (chunk_goes_wide(wide, g, gn)) {
        if (is_pointwise(g)) gather_wide(xc, col.p, g.C_in, P, gn);  // rounded, images side by side
        else im2col(xc, col.p, g, gn, true);
        gemm_conv_forward_wide(wu, col.p, yw.p, yc, b, bs, g, gn);
        continue;
      }
      const U* cols = nullptr;
      if constexpr (std::is_same_v<U, T>) cols = xc;  // used only when in place
      if (!in_place) {
        if (is_pointwise(g)) gather_wide(xc, col.p, 1, gn * col_img, 1);  // rounded copy
        else im2col(xc, col.p, g, gn, false);
        cols = col.p;
      }
      gemm_conv_forward(wu, cols, col_img, yc, g, gn);
      add_bias(yc, b, bs, gn, g.C_out, P);
    }
  });
}

/// dx = W^T dout by GEMM, then col2im (a pointwise conv writes the GEMM straight into dx, or
/// scatters its wide result there).
template <class T>
void gemm_path_backward_input(const T* dy, const T* w, T* dx, const Conv2dGeometry& g, Device dev) {
  const int64_t P = g.Ho * g.Wo, col_img = g.C_in * g.kH * g.kW * P;
  const bool pointwise = is_pointwise(g);
  with_operand_type<T>(g, [&](auto zero_u) {
    using U = decltype(zero_u);
    constexpr bool round = !std::is_same_v<U, T>;
    const bool wide = odd_maps_go_wide(g, round);
    // per image: float columns for col2im (not pointwise) or the wide GEMM's result, rounded
    // dout (bf16), counted in float-sized elements against the workspace
    const int64_t dy_img = g.C_out * P;
    const bool need_col = !pointwise || wide;
    int64_t G = chunk_images(g, (need_col ? col_img : 0) + (round ? dy_img : 0));
    if (wide) G = wide_chunk_images(G);
    Scratch<T, T> col(need_col ? G * col_img : 0, dev);
    Scratch<T, U> wbuf, dyr(round ? G * dy_img : 0, dev);
    const U* wu = weight_operand(w, g.C_out * K_of(g), wbuf, dev);
    for (int64_t n0 = 0; n0 < g.N; n0 += G) {
      const int64_t gn = std::min(G, g.N - n0);
      T* dxc = dx + n0 * g.C_in * g.H * g.W;
      const T* dyc = dy + n0 * dy_img;
      const bool chunk_wide = chunk_goes_wide(wide, g, gn);
      const U* dyu = nullptr;
      if constexpr (round) {
        if (chunk_wide) gather_wide(dyc, dyr.p, g.C_out, P, gn);  // rounded, images side by side
        else gather_wide(dyc, dyr.p, 1, gn * dy_img, 1);
        dyu = dyr.p;
      } else {
        dyu = dyc;
      }
      if (chunk_wide) {  // dcol (K, gn*P) = W^T (K, C_out) @ dout (C_out, gn*P)
        const int64_t K = K_of(g), GP = gn * P;
        gemm<T, U>(true, false, K, GP, g.C_out, T(1), wu, K, 0, dyu, GP, 0, T(0), col.p, GP, 0, 1);
        if (pointwise) {
          gather_wide(col.p, dxc, gn, P, g.C_in);  // (C_in, gn, P) -> (gn, C_in, P)
          continue;
        }
      } else {
        gemm_conv_backward_input(wu, dyu, pointwise ? dxc : col.p, col_img, g, gn);
        if (pointwise) continue;
      }
      const int64_t total = gn * g.C_in * g.H * g.W;
      with_index_type(std::max(total, gn * col_img), [&](auto zero_i) {
        using I = decltype(zero_i);
        const bool patch = g.kH == g.sH && g.kW == g.sW && g.pH == 0 && g.pW == 0 && g.dH == 1 && g.dW == 1;
        col2im_kernel<T, I><<<blocks_for(total), kThreads, 0, stream()>>>(col.p, dxc, g, I(gn), chunk_wide, patch,
                                                                          I(total));
      });
      check_launch("conv2d_backward_input (col2im)");
    }
  });
}

/// dW[gi] (OCg, K) = sum over images of dout[n][gi] (OCg, P) @ col[n][gi]^T (P, K). Images go
/// side by side (the wide layout: dout and columns as (rows, gn*P)), so one GEMM of depth gn*P
/// per chunk sums them, and the chunks accumulate with beta = 1. A chunk of one image needs no
/// gathering (wide == per-image layout), nor columns for a pointwise conv, unless the operands
/// are rounded to bf16; maps of 4096+ positions already give deep GEMMs, so they go one image
/// at a time. With a source type S or a load other than as-is (gelu_conv2d's bfloat16 input), the
/// conv must be pointwise, and the columns are always staged through load.
template <class T, class S = T, class Load = LoadAsIs>
void gemm_path_backward_weight(const T* dy, const S* x, T* dw, const Conv2dGeometry& g, Device dev, Load load = {}) {
  const int64_t OCg = g.cout_g(), K = K_of(g), P = g.Ho * g.Wo;
  const bool pointwise = is_pointwise(g);
  const int64_t col_rows = g.C_in * g.kH * g.kW;
  const int64_t per_image = (col_rows + g.C_out) * P;
  with_operand_type<T>(g, [&](auto zero_u) {
    using U = decltype(zero_u);
    constexpr bool round = !std::is_same_v<U, T>;
    int64_t G = P >= 4096 ? 1 : chunk_images(g, per_image);
    if (odd_maps_go_wide(g, round)) G = wide_chunk_images(G);  // rows of a multiple of 8 operands
    constexpr bool as_is = std::is_same_v<S, T> && std::is_same_v<Load, LoadAsIs>;
    const bool need_col = !pointwise || G > 1 || round || !as_is, need_dy = G > 1 || round;
    Scratch<T, U> col(need_col ? G * col_rows * P : 0, dev), dyw(need_dy ? G * g.C_out * P : 0, dev);
    for (int64_t n0 = 0; n0 < g.N; n0 += G) {
      const int64_t gn = std::min(G, g.N - n0), GP = gn * P;
      const S* xc = x + n0 * g.C_in * g.H * g.W;
      const T* dyc = dy + n0 * g.C_out * P;
      const U* cols = nullptr;
      const U* dys = nullptr;
      if constexpr (!round) dys = dyc;  // pointwise, one image: dout and (as is) the image are the operands
      if constexpr (!round && as_is) cols = xc;
      if (!pointwise) {
        if constexpr (as_is) im2col(xc, col.p, g, gn, true);
        else DG_CHECK(false, "conv2d_backward_weight: a staged input needs a pointwise conv");
        cols = col.p;
      } else if (gn > 1 || round || !as_is) {
        gather_wide(xc, col.p, g.C_in, P, gn, load);
        cols = col.p;
      }
      if (gn > 1 || round) {
        gather_wide(dyc, dyw.p, g.C_out, P, gn);
        dys = dyw.p;
      }
      gemm<T, U>(false, true, OCg, K, GP, T(1), dys, GP, OCg * GP, cols, GP, K * GP, n0 == 0 ? T(0) : T(1), dw, K,
                 OCg * K, g.groups);
    }
  });
}

// ---------------------------------------------------------------- launchers: depthwise

/// Fills the sizes every depthwise kernel shares; false when a size does not fit the int
/// indices of the kernels (then the GEMM path runs instead).
inline bool dw_params(const Conv2dGeometry& g, DwParams& d) {
  const int64_t big = int64_t(1) << 30;
  if (g.H * g.W >= big || g.Ho * g.Wo >= big || g.C_in >= big || g.N * g.C_in >= big) return false;
  d = DwParams{};
  d.C = int(g.C_in), d.H = int(g.H), d.W = int(g.W), d.Ho = int(g.Ho), d.Wo = int(g.Wo);
  d.kH = int(g.kH), d.kW = int(g.kW), d.sH = int(g.sH), d.sW = int(g.sW);
  d.pH = int(g.pH), d.pW = int(g.pW), d.dH = int(g.dH), d.dW = int(g.dW);
  return d.kH * int64_t(d.dH) < big && d.kW * int64_t(d.dW) < big && d.pH < big / 2 && d.pW < big / 2;
}

/// A thread block (by, bx) for a tile over a rows x cols plane whose staged patch (from
/// patch(by, bx)) fits kMaxSmem next to `extra` elements: up to 32 x 8 threads, halved while
/// it does not fit. False when not even one thread's patch fits.
template <class T, class Patch>
bool pick_block(int64_t rows, int64_t cols, int64_t extra, Patch patch, int& by, int& bx, int& ph, int& pw) {
  bx = pow2_at_least(cols, 32);
  by = pow2_at_least(rows, kThreads / bx);
  for (;;) {
    patch(by, bx, ph, pw);
    if ((int64_t(ph) * pw + extra) * int64_t(sizeof(T)) <= int64_t(kMaxSmem)) return true;
    if (by == 1 && bx == 1) return false;
    if (by >= bx) by /= 2;
    else bx /= 2;
  }
}

/// Launches the tiled depthwise forward; false when it does not apply (then use the GEMM path).
template <class T>
bool depthwise_forward(const T* x, const T* w, const T* b, int64_t bs, T* y, const Conv2dGeometry& g) {
  DwParams d;
  if (!dw_params(g, d)) return false;
  int by, bx;
  auto patch = [&](int by_, int bx_, int& ph, int& pw) {
    ph = (by_ - 1) * d.sH + (d.kH - 1) * d.dH + 1;
    pw = (bx_ - 1) * d.sW + (d.kW - 1) * d.dW + 1;
  };
  if (!pick_block<T>(g.Ho, g.Wo, g.kH * g.kW, patch, by, bx, d.patch_h, d.patch_w)) return false;
  d.tiles_h = int((g.Ho + by - 1) / by), d.tiles_w = int((g.Wo + bx - 1) / bx);
  const int64_t blocks = g.N * g.C_in * d.tiles_h * d.tiles_w;
  if (blocks >= INT_MAX) return false;
  const size_t smem = (size_t(d.patch_h) * d.patch_w + g.kH * g.kW) * sizeof(T);
  depthwise_forward_kernel<T><<<unsigned(blocks), dim3(bx, by), smem, stream()>>>(x, w, b, bs, y, d);
  check_launch("conv2d (depthwise)");
  return true;
}

/// Launches the tiled depthwise grad input; false when it does not apply.
template <class T>
bool depthwise_backward_input(const T* dy, const T* w, T* dx, const Conv2dGeometry& g) {
  DwParams d;
  if (!dw_params(g, d)) return false;
  int by, bx;
  auto patch = [&](int by_, int bx_, int& ph, int& pw) {  // dout rows/cols under a tile (see the kernel)
    ph = (by_ - 1 + (d.kH - 1) * d.dH) / d.sH + 2;
    pw = (bx_ - 1 + (d.kW - 1) * d.dW) / d.sW + 2;
  };
  if (!pick_block<T>(g.H, g.W, g.kH * g.kW, patch, by, bx, d.patch_h, d.patch_w)) return false;
  d.tiles_h = int((g.H + by - 1) / by), d.tiles_w = int((g.W + bx - 1) / bx);
  const int64_t blocks = g.N * g.C_in * d.tiles_h * d.tiles_w;
  if (blocks >= INT_MAX) return false;
  const size_t smem = (size_t(d.patch_h) * d.patch_w + g.kH * g.kW) * sizeof(T);
  if (d.sH == 1 && d.sW == 1)
    depthwise_backward_input_kernel<T, true><<<unsigned(blocks), dim3(bx, by), smem, stream()>>>(dy, w, dx, d);
  else
    depthwise_backward_input_kernel<T, false><<<unsigned(blocks), dim3(bx, by), smem, stream()>>>(dy, w, dx, d);
  check_launch("conv2d_backward_input (depthwise)");
  return true;
}

/// Launches the depthwise grad weight (two stages when images are split over blocks); false when
/// it does not apply.
template <class T>
bool depthwise_backward_weight(const T* dy, const T* x, T* dw, const Conv2dGeometry& g, Device dev) {
  DwParams d;
  if (!dw_params(g, d) || g.N >= INT_MAX) return false;
  const int nt = kThreads;
  // tiles of up to 32 x 32 output positions, halved while the tile + patch + reduction buffer
  // do not fit
  int tile_w = pow2_at_least(g.Wo, 32), tile_h = pow2_at_least(g.Ho, 1024 / tile_w);
  auto smem_of = [&](int th, int tw) {
    d.patch_h = (th - 1) * d.sH + (d.kH - 1) * d.dH + 1;
    d.patch_w = (tw - 1) * d.sW + (d.kW - 1) * d.dW + 1;
    return (int64_t(th) * tw + int64_t(d.patch_h) * d.patch_w + nt) * int64_t(sizeof(T));
  };
  while (smem_of(tile_h, tile_w) > int64_t(kMaxSmem)) {
    if (tile_h == 1 && tile_w == 1) return false;
    if (tile_h >= tile_w) tile_h /= 2;
    else tile_w /= 2;
  }
  const size_t smem = static_cast<size_t>(smem_of(tile_h, tile_w));
  int64_t per = 0;
  const int64_t chunks = image_chunks(g.C_in, g.N, per);
  if (chunks * g.C_in >= INT_MAX) return false;
  const int64_t wsize = g.C_in * g.kH * g.kW;
  Tensor<T> part = chunks > 1 ? empty<T>({chunks * wsize}, dev) : Tensor<T>();
  depthwise_backward_weight_kernel<T><<<unsigned(chunks * g.C_in), nt, smem, stream()>>>(
      dy, x, chunks > 1 ? part.data() : dw, d, int(g.N), int(chunks), int(per), tile_h, tile_w);
  check_launch("conv2d_backward_weight (depthwise)");
  if (chunks > 1) {
    sum_chunks_kernel<T><<<blocks_for(wsize), kThreads, 0, stream()>>>(part.data(), dw, wsize, int(chunks));
    check_launch("conv2d_backward_weight (depthwise sum)");
  }
  return true;
}

// ---------------------------------------------------------------- launchers: depthwise, stride 1, K x K

/// True when the register kernels apply: depthwise, stride 1, dilation 1, a square 3x3, 5x5 or
/// 7x7 kernel, sizes that fit their int indices.
inline bool depthwise_s1_applies(const Conv2dGeometry& g) {
  const int64_t big = int64_t(1) << 29;
  return is_depthwise(g) && g.sH == 1 && g.sW == 1 && g.dH == 1 && g.dW == 1 && g.kH == g.kW &&
         (g.kH == 3 || g.kH == 5 || g.kH == 7) && g.H < big && g.W < big && g.Ho < big && g.Wo < big &&
         g.C_in < big && g.pH < big && g.pW < big && g.N < INT_MAX;
}

/// Runs f(std::integral_constant<int, K>{}) for K = 3, 5 or 7.
template <class F>
void with_taps(int64_t K, F&& f) {
  if (K == 3) f(std::integral_constant<int, 3>{});
  else if (K == 5) f(std::integral_constant<int, 5>{});
  else f(std::integral_constant<int, 7>{});
}

/// One launch of depthwise_s1_kernel over an (N, C, rows, cols) output from an input of
/// in_h x in_w planes, images x_sn apart.
template <class T, bool kFlip>
void depthwise_s1_launch(const T* x, int64_t x_sn, const T* w, const T* b, int64_t bs, T* y, int64_t N, int64_t C,
                         int64_t in_h, int64_t in_w, int64_t rows, int64_t cols, int64_t pH, int64_t pW, int64_t K,
                         const char* what) {
  const int64_t strips = (rows + kStrip - 1) / kStrip;
  const int64_t total = N * C * strips * cols;
  DG_CHECK((total + kThreads - 1) / kThreads < INT_MAX, what, ": too many outputs for one launch");
  with_taps(K, [&](auto k) {
    const unsigned blocks = unsigned((total + kThreads - 1) / kThreads);
    const int ci = int(C), h = int(in_h), w_ = int(in_w), r = int(rows), co = int(cols), ph = int(pH), pw = int(pW);
    if (total < INT_MAX - kThreads)
      depthwise_s1_kernel<T, decltype(k)::value, kFlip, int><<<blocks, kThreads, 0, stream()>>>(
          x, x_sn, w, b, bs, y, ci, h, w_, r, co, ph, pw, int(strips), int(total));
    else
      depthwise_s1_kernel<T, decltype(k)::value, kFlip, int64_t><<<blocks, kThreads, 0, stream()>>>(
          x, x_sn, w, b, bs, y, ci, h, w_, r, co, ph, pw, int(strips), total);
  });
  check_launch(what);
}

/// Grad weight of a stride-1 depthwise conv (depthwise_s1_applies): per-chunk sums, then the
/// chunks added in order when the images are split.
template <class T>
void depthwise_s1_backward_weight(const T* dy, const T* x, int64_t x_sn, T* dw, const Conv2dGeometry& g, Device dev) {
  const int64_t strips = (g.Ho + kStrip - 1) / kStrip, taps = g.kH * g.kW;
  // about 8 blocks per multiprocessor over channels x image chunks
  const int64_t want = std::clamp<int64_t>((8 * int64_t(sm_count()) + g.C_in - 1) / g.C_in, 1, g.N);
  const int64_t per = (g.N + want - 1) / want, chunks = (g.N + per - 1) / per;
  DG_CHECK(chunks * g.C_in < INT_MAX, "conv2d_backward_weight: C = ", g.C_in, " is too large");
  Tensor<T> part = chunks > 1 ? empty<T>({chunks * g.C_in * taps}, dev) : Tensor<T>();
  with_taps(g.kH, [&](auto k) {
    depthwise_s1_weight_kernel<T, decltype(k)::value><<<unsigned(chunks * g.C_in), kThreads, 0, stream()>>>(
        dy, x, x_sn, chunks > 1 ? part.data() : dw, int(g.C_in), int(g.H), int(g.W), int(g.Ho), int(g.Wo),
        int(g.pH), int(g.pW), int(strips), int(g.N), int(per), int(chunks));
  });
  check_launch("conv2d_backward_weight (depthwise, stride 1)");
  if (chunks > 1) {
    sum_chunks_kernel<T><<<blocks_for(g.C_in * taps), kThreads, 0, stream()>>>(part.data(), dw, g.C_in * taps,
                                                                                int(chunks));
    check_launch("conv2d_backward_weight (depthwise, stride 1, sum)");
  }
}

}  // namespace conv_detail

// ---------------------------------------------------------------- the table's entries

/// out = conv2d(x, w, b) (torch.nn.functional.conv2d); x: (N, C_in, H, W), w: (C_out,
/// C_in/groups, kH, kW), b: (C_out) or undefined; out: (N, C_out, Ho, Wo) on x's device.
/// Example: `auto y = dg::cuda::conv2d_forward(x, w, b, dg::conv2d_geometry(...));`
template <class T>
Tensor<T> conv2d_forward(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& b, const Conv2dGeometry& g) {
  using namespace conv_detail;
  const Device dev =
      check_inputs<T>("conv2d", {{&x, g.x_shape()}, {&w, g.w_shape()}, {&b, Shape{g.C_out}}}, /*batch_strided=*/&x);
  Tensor<T> y = empty<T>(g.out_shape(), dev);
  if (y.numel() == 0) return y;
  const T* pb = b.defined() ? b.data() : nullptr;
  const int64_t bs = b.defined() ? b.strides()[0] : 0;
  if (depthwise_s1_applies(g)) {  // reads a batch-strided x in place
    depthwise_s1_launch<T, false>(x.data(), batch_stride(x), w.data(), pb, bs, y.data(), g.N, g.C_in, g.H, g.W, g.Ho,
                                  g.Wo, g.pH, g.pW, g.kH, "conv2d (depthwise, stride 1)");
    return y;
  }
  const Tensor<T> xc = x.is_contiguous() ? x : x.contiguous();
  if (is_depthwise(g) && depthwise_forward(xc.data(), w.data(), pb, bs, y.data(), g)) return y;
  gemm_path_forward(xc.data(), w.data(), pb, bs, y.data(), g, dev);
  return y;
}

/// dx of conv2d: dout (N, C_out, Ho, Wo), w (C_out, C_in/groups, kH, kW) -> dx (N, C_in, H, W).
template <class T>
Tensor<T> conv2d_backward_input(const Tensor<T>& dout, const Tensor<T>& w, const Conv2dGeometry& g) {
  using namespace conv_detail;
  const Device dev = check_inputs<T>("conv2d_backward_input", {{&dout, g.out_shape()}, {&w, g.w_shape()}});
  Tensor<T> dx = empty<T>(g.x_shape(), dev);
  if (dx.numel() == 0) return dx;
  if (dout.numel() == 0) {  // no output read any input
    zero(dx.data(), dx.numel());
    return dx;
  }
  if (depthwise_s1_applies(g)) {  // a stride-1 conv of dout with the taps transposed
    depthwise_s1_launch<T, true>(dout.data(), g.C_out * g.Ho * g.Wo, w.data(), nullptr, 0, dx.data(), g.N, g.C_in,
                                 g.Ho, g.Wo, g.H, g.W, g.kH - 1 - g.pH, g.kW - 1 - g.pW, g.kH,
                                 "conv2d_backward_input (depthwise, stride 1)");
    return dx;
  }
  if (is_depthwise(g) && depthwise_backward_input(dout.data(), w.data(), dx.data(), g)) return dx;
  gemm_path_backward_input(dout.data(), w.data(), dx.data(), g, dev);
  return dx;
}

/// dweight of conv2d: dout (N, C_out, Ho, Wo), x (N, C_in, H, W) -> dw (C_out, C_in/groups, kH, kW).
template <class T>
Tensor<T> conv2d_backward_weight(const Tensor<T>& dout, const Tensor<T>& x, const Conv2dGeometry& g) {
  using namespace conv_detail;
  const Device dev = check_inputs<T>("conv2d_backward_weight", {{&dout, g.out_shape()}, {&x, g.x_shape()}},
                                     /*batch_strided=*/&x);
  Tensor<T> dw = empty<T>(g.w_shape(), dev);
  if (dw.numel() == 0) return dw;
  if (dout.numel() == 0) {  // an empty sum
    zero(dw.data(), dw.numel());
    return dw;
  }
  if (depthwise_s1_applies(g)) {  // reads a batch-strided x in place
    depthwise_s1_backward_weight(dout.data(), x.data(), batch_stride(x), dw.data(), g, dev);
    return dw;
  }
  const Tensor<T> xc = x.is_contiguous() ? x : x.contiguous();
  if (is_depthwise(g) && depthwise_backward_weight(dout.data(), xc.data(), dw.data(), g, dev)) return dw;
  gemm_path_backward_weight(dout.data(), xc.data(), dw.data(), g, dev);
  return dw;
}

/// dbias of conv2d: dout (N, C_out, Ho, Wo) -> (C_out), the sum over (n, oh, ow).
template <class T>
Tensor<T> conv2d_backward_bias(const Tensor<T>& dout, const Conv2dGeometry& g) {
  using namespace conv_detail;
  const Device dev = check_inputs<T>("conv2d_backward_bias", {{&dout, g.out_shape()}});
  Tensor<T> db = empty<T>({g.C_out}, dev);
  if (db.numel() == 0) return db;
  if (dout.numel() == 0) {  // an empty sum
    zero(db.data(), db.numel());
    return db;
  }
  // per-channel sums over chunks of images (enough blocks to fill the GPU when C_out is
  // small), then the chunks added in order: deterministic
  int64_t per = 0;
  const int64_t chunks = image_chunks(g.C_out, g.N, per);
  DG_CHECK(chunks * g.C_out < INT_MAX, "conv2d_backward_bias: C_out = ", g.C_out, " is too large");
  Tensor<T> part = chunks > 1 ? empty<T>({chunks * g.C_out}, dev) : Tensor<T>();
  const int64_t P = g.Ho * g.Wo;
  const bool quads = sizeof(T) <= 4 && P % 4 == 0 && quad_aligned(dout.data());
  with_index_type(dout.numel(), [&](auto zero_i) {
    using I = decltype(zero_i);
    bias_grad_kernel<T, I><<<unsigned(chunks * g.C_out), kThreads, 0, stream()>>>(
        dout.data(), chunks > 1 ? part.data() : db.data(), I(g.N), I(g.C_out), I(P), I(chunks), I(per), quads);
  });
  check_launch("conv2d_backward_bias");
  if (chunks > 1) {
    sum_chunks_kernel<T><<<blocks_for(g.C_out), kThreads, 0, stream()>>>(part.data(), db.data(), g.C_out,
                                                                          int(chunks));
    check_launch("conv2d_backward_bias (sum)");
  }
  return db;
}

// ---------------------------------------------------------------- gelu_conv2d with its input kept in bfloat16

namespace conv_detail {
/// hs as bfloat16 operands, after checking that it is the contiguous (N, C_in, H, W) of g on dev.
inline bf16_t* bf16_input(const Tensor<bfloat16>& hs, const Conv2dGeometry& g, Device dev, const char* op) {
  DG_CHECK(hs.defined() && hs.device() == dev && hs.shape() == g.x_shape() && hs.is_contiguous(), op,
           ": expected a contiguous bfloat16 tensor of shape ", shape_str(g.x_shape()), " on ", dev.str(),
           " for the kept input, got ", hs.defined() ? shape_str(hs.shape()) + " on " + hs.device().str() : "none");
  return reinterpret_cast<bf16_t*>(hs.data());
}
/// The pointwise, ungrouped conv with bf16 products whose GEMM operands gelu_conv2d stages from hs itself.
inline bool gelu_stages_operands(const Conv2dGeometry& g) { return is_pointwise(g) && g.bf16 && g.groups == 1; }
}  // namespace conv_detail

/// gelu_conv2d's forward under bf16 products: hs <- h rounded to bfloat16, y = conv2d(gelu(hs), w, b).
/// A pointwise conv stages its GEMM operands straight from h, chunk by chunk (one pass writes hs and
/// round(gelu(hs))); other convs make gelu(hs) in float first and run conv2d_forward on it.
inline Tensor<float> gelu_conv2d_bf16_forward(const Tensor<float>& h, const Tensor<bfloat16>& hs,
                                              const Tensor<float>& w, const Tensor<float>& b,
                                              const Conv2dGeometry& g, bool tanh) {
  using namespace conv_detail;
  const Device dev = check_inputs<float>("gelu_conv2d", {{&h, g.x_shape()}, {&w, g.w_shape()}, {&b, Shape{g.C_out}}});
  DG_CHECK(h.is_contiguous(), "gelu_conv2d: the CUDA kernel expects a contiguous input");
  bf16_t* hp = bf16_input(hs, g, dev, "gelu_conv2d");
  const int64_t img = g.C_in * g.H * g.W, P = g.Ho * g.Wo;
  if (!gelu_stages_operands(g) || g.N * g.C_out * P == 0) {
    Tensor<float> a = empty<float>(h.shape(), dev);
    gather_wide(h.data(), a.data(), 1, h.numel(), 1, KeepBf16Gelu{hp, tanh});
    return conv2d_forward(a, w, b, g);
  }
  Tensor<float> y = empty<float>(g.out_shape(), dev);
  const float* bp = b.defined() ? b.data() : nullptr;
  const int64_t bs = b.defined() ? b.strides()[0] : 0, y_img = g.C_out * P;
  const bool wide = odd_maps_go_wide(g, true);  // as in gemm_path_forward
  int64_t G = chunk_images(g, img + (wide ? y_img : 0));
  if (wide) G = wide_chunk_images(G);
  Scratch<float, bf16_t> wbuf, col(G * img, dev);
  Scratch<float, float> yw(wide ? G * y_img : 0, dev);
  const bf16_t* wu = weight_operand(w.data(), g.C_out * K_of(g), wbuf, dev);
  for (int64_t n0 = 0; n0 < g.N; n0 += G) {
    const int64_t gn = std::min(G, g.N - n0);
    float* yc = y.data() + n0 * y_img;
    const KeepBf16Gelu load{hp + n0 * img, tanh};
    if (chunk_goes_wide(wide, g, gn)) {
      gather_wide(h.data() + n0 * img, col.p, g.C_in, P, gn, load);
      gemm_conv_forward_wide(wu, col.p, yw.p, yc, bp, bs, g, gn);
      continue;
    }
    gather_wide(h.data() + n0 * img, col.p, 1, gn * img, 1, load);
    gemm_conv_forward(wu, col.p, img, yc, g, gn);
    add_bias(yc, bp, bs, gn, g.C_out, P);
  }
  return y;
}

/// dweight of gelu_conv2d under bf16 products, its input read from hs (the GELU taken on the way
/// into the GEMM's columns for a pointwise conv; in a float tensor first otherwise).
inline Tensor<float> gelu_conv2d_bf16_backward_weight(const Tensor<float>& dout, const Tensor<bfloat16>& hs,
                                                      const Conv2dGeometry& g, bool tanh) {
  using namespace conv_detail;
  const Device dev = check_inputs<float>("gelu_conv2d backward", {{&dout, g.out_shape()}});
  const bf16_t* hp = bf16_input(hs, g, dev, "gelu_conv2d backward");
  if (!gelu_stages_operands(g) || dout.numel() == 0 || hs.numel() == 0) {
    Tensor<float> a = empty<float>(g.x_shape(), dev);
    gather_wide(hp, a.data(), 1, a.numel(), 1, GeluOfBf16{tanh});
    return conv2d_backward_weight(dout, a, g);
  }
  Tensor<float> dw = empty<float>(g.w_shape(), dev);
  gemm_path_backward_weight(dout.data(), hp, dw.data(), g, dev, GeluOfBf16{tanh});
  return dw;
}

/// dg *= gelu'(hs) in place: gelu_conv2d's input gradient.
inline void gelu_grad_bf16_(const Tensor<float>& dg, const Tensor<bfloat16>& hs, bool tanh) {
  using namespace conv_detail;
  const Device dev = dg.device();
  DG_CHECK(dev.is_cuda() && dg.is_contiguous(), "gelu_conv2d backward: expected a contiguous CUDA gradient, got ",
           dg.device().str());
  DG_CHECK(hs.defined() && hs.device() == dev && hs.shape() == dg.shape() && hs.is_contiguous(),
           "gelu_conv2d backward: expected the kept input of shape ", shape_str(dg.shape()), " on ", dev.str());
  const int64_t total = dg.numel();
  if (total == 0) return;
  const auto* hp = reinterpret_cast<const bf16_t*>(hs.data());
  const bool quads = total % 4 == 0 && quad_aligned(dg.data()) && quad_aligned(hp);
  with_index_type(total, [&](auto zero_i) {
    using I = decltype(zero_i);
    if (quads)
      gelu_grad_bf16_kernel<I><<<blocks_for(total / 4), kThreads, 0, stream()>>>(
          reinterpret_cast<Quad<float>*>(dg.data()), reinterpret_cast<const Quad<bf16_t>*>(hp), I(total / 4), tanh);
    else
      gelu_grad_bf16_scalar_kernel<I><<<blocks_for(total), kThreads, 0, stream()>>>(dg.data(), hp, I(total), tanh);
  });
  check_launch("gelu_conv2d backward (gelu')");
}

/// Installs the conv2d kernels in the table (and, for float, gelu_conv2d's bfloat16-input ones).
template <class T>
void register_conv(DeviceKernels<T>& k) {
  k.conv2d_forward = DG_CUDA_ON_DEVICE(conv2d_forward<T>);
  k.conv2d_backward_input = DG_CUDA_ON_DEVICE(conv2d_backward_input<T>);
  k.conv2d_backward_weight = DG_CUDA_ON_DEVICE(conv2d_backward_weight<T>);
  k.conv2d_backward_bias = DG_CUDA_ON_DEVICE(conv2d_backward_bias<T>);
  if constexpr (std::is_same_v<T, float>) {
    k.gelu_conv2d_bf16_forward = DG_CUDA_ON_DEVICE(gelu_conv2d_bf16_forward);
    k.gelu_conv2d_bf16_backward_weight = DG_CUDA_ON_DEVICE(gelu_conv2d_bf16_backward_weight);
    k.gelu_grad_bf16_ = DG_CUDA_ON_DEVICE(gelu_grad_bf16_);
  }
}

}  // namespace dg::cuda
