// Multi-scale deformable attention: forward and backward (Deformable-DETR semantics, spec section 6).
//
// Compiled at run time by CuPy (NVRTC) with -DCODETR_SCALAR=float or -DCODETR_SCALAR=double, and for the CPU
// by g++ through kernels/cpu_shim.h (the tests run this very file against the PyTorch reference).
// No warp shuffles, shared memory or barriers: every thread is independent, so running the threads one
// after another on the CPU gives the same result as the GPU up to the order of the atomic additions.
//
// Arguments (all arrays C-contiguous, scalar_t = CODETR_SCALAR, sizes are int32):
//   value               scalar_t [B, S, M, D]       S = sum_l H_l * W_l tokens, level-major, row-major
//   spatial_shapes      int64    [L, 2]             rows (H_l, W_l)
//   level_start_index   int64    [L]                first token of level l in S
//   sampling_locations  scalar_t [B, Q, M, L, P, 2] normalised (x, y); (0, 0) is the top-left map corner
//   attention_weights   scalar_t [B, Q, M, L, P]
//   output              scalar_t [B, Q, M, D]       (= [B, Q, M*D]), written (not accumulated)
//   grad_output         scalar_t [B, Q, M, D]
//   grad_value          scalar_t [B, S, M, D]       accumulated with atomicAdd: the caller zeroes it
//   grad_sampling_loc   scalar_t [B, Q, M, L, P, 2] written
//   grad_attn_weight    scalar_t [B, Q, M, L, P]    written
//
// Coordinate convention: pixel = loc * size - 0.5, so pixel centres sit at (i + 0.5) / size. A point is
// sampled only when -1 < y < H and -1 < x < W; bilinear interpolation over the corners floor and floor + 1,
// where a corner outside [0, H-1] x [0, W-1] counts as 0 (grid_sample, align_corners=False, zero padding).
//
// Thread mapping (grid-stride loops, 64-bit linear indices):
//   ms_deform_attn_forward          one thread per output element (b, q, m, d); d is fastest, so a warp
//                                   reads consecutive channels of the same corner (coalesced) and shares
//                                   the (l, p) locations and weights (broadcast loads).
//   ms_deform_attn_backward_value   one thread per (b, q, m, d): scatters w * g * corner weight into
//                                   grad_value with atomicAdd; consecutive d give coalesced reductions.
//   ms_deform_attn_backward_sampling one thread per (b, q, m, l, p): loops over d to form
//                                   dL/dw = sum_d g * v and dL/dloc = w * sum_d g * dv/dloc; no atomics.

typedef CODETR_SCALAR scalar_t;

// Bilinear sample of channel d of head m at pixel (y, x) of one level; also returns dv/dy and dv/dx when
// the pointers are non-null. `v` points at value[b, level_start, m, 0]; a pixel (h, w) is at
// v[(h * W + w) * row_stride + d] with row_stride = M * D.
__device__ __forceinline__ scalar_t msda_bilinear(const scalar_t* v, int H, int W, long long row_stride, int d,
                                                  scalar_t y, scalar_t x, scalar_t* dv_dy, scalar_t* dv_dx) {
  const int y0 = (int)floor(y), x0 = (int)floor(x);
  const int y1 = y0 + 1, x1 = x0 + 1;
  const scalar_t ly = y - y0, lx = x - x0, hy = 1 - ly, hx = 1 - lx;
  scalar_t v00 = 0, v01 = 0, v10 = 0, v11 = 0;
  if (y0 >= 0 && x0 >= 0) v00 = v[((long long)y0 * W + x0) * row_stride + d];
  if (y0 >= 0 && x1 <= W - 1) v01 = v[((long long)y0 * W + x1) * row_stride + d];
  if (y1 <= H - 1 && x0 >= 0) v10 = v[((long long)y1 * W + x0) * row_stride + d];
  if (y1 <= H - 1 && x1 <= W - 1) v11 = v[((long long)y1 * W + x1) * row_stride + d];
  if (dv_dy) *dv_dy = hx * (v10 - v00) + lx * (v11 - v01);
  if (dv_dx) *dv_dx = hy * (v01 - v00) + ly * (v11 - v10);
  return hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11;
}

// Scatter `g` into the four corners of pixel (y, x) of grad_value (same addressing as msda_bilinear).
__device__ __forceinline__ void msda_scatter(scalar_t* gv, int H, int W, long long row_stride, int d,
                                             scalar_t y, scalar_t x, scalar_t g) {
  const int y0 = (int)floor(y), x0 = (int)floor(x);
  const int y1 = y0 + 1, x1 = x0 + 1;
  const scalar_t ly = y - y0, lx = x - x0, hy = 1 - ly, hx = 1 - lx;
  if (y0 >= 0 && x0 >= 0) atomicAdd(gv + ((long long)y0 * W + x0) * row_stride + d, hy * hx * g);
  if (y0 >= 0 && x1 <= W - 1) atomicAdd(gv + ((long long)y0 * W + x1) * row_stride + d, hy * lx * g);
  if (y1 <= H - 1 && x0 >= 0) atomicAdd(gv + ((long long)y1 * W + x0) * row_stride + d, ly * hx * g);
  if (y1 <= H - 1 && x1 <= W - 1) atomicAdd(gv + ((long long)y1 * W + x1) * row_stride + d, ly * lx * g);
}

extern "C" __global__ void ms_deform_attn_forward(
    const scalar_t* __restrict__ value, const long long* __restrict__ spatial_shapes,
    const long long* __restrict__ level_start_index, const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights, scalar_t* __restrict__ output,
    int B, int S, int M, int D, int Q, int L, int P) {
  const long long n = (long long)B * Q * M * D;
  const long long row_stride = (long long)M * D;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    const int d = (int)(i % D);
    const long long bqm = i / D;  // (b * Q + q) * M + m
    const int m = (int)(bqm % M);
    const int b = (int)(bqm / ((long long)Q * M));
    const scalar_t* loc = sampling_locations + bqm * L * P * 2;
    const scalar_t* attn = attention_weights + bqm * L * P;
    scalar_t acc = 0;
    for (int l = 0; l < L; ++l) {
      const int H = (int)spatial_shapes[2 * l], W = (int)spatial_shapes[2 * l + 1];
      const scalar_t* v = value + ((long long)b * S + level_start_index[l]) * row_stride + (long long)m * D;
      for (int p = 0; p < P; ++p) {
        const int lp = l * P + p;
        const scalar_t y = loc[2 * lp + 1] * H - (scalar_t)0.5, x = loc[2 * lp] * W - (scalar_t)0.5;
        if (y > -1 && x > -1 && y < H && x < W)
          acc += attn[lp] * msda_bilinear(v, H, W, row_stride, d, y, x, nullptr, nullptr);
      }
    }
    output[i] = acc;
  }
}

extern "C" __global__ void ms_deform_attn_backward_value(
    const scalar_t* __restrict__ grad_output, const long long* __restrict__ spatial_shapes,
    const long long* __restrict__ level_start_index, const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights, scalar_t* grad_value,
    int B, int S, int M, int D, int Q, int L, int P) {
  const long long n = (long long)B * Q * M * D;
  const long long row_stride = (long long)M * D;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    const int d = (int)(i % D);
    const long long bqm = i / D;
    const int m = (int)(bqm % M);
    const int b = (int)(bqm / ((long long)Q * M));
    const scalar_t* loc = sampling_locations + bqm * L * P * 2;
    const scalar_t* attn = attention_weights + bqm * L * P;
    const scalar_t g = grad_output[i];
    for (int l = 0; l < L; ++l) {
      const int H = (int)spatial_shapes[2 * l], W = (int)spatial_shapes[2 * l + 1];
      scalar_t* gv = grad_value + ((long long)b * S + level_start_index[l]) * row_stride + (long long)m * D;
      for (int p = 0; p < P; ++p) {
        const int lp = l * P + p;
        const scalar_t y = loc[2 * lp + 1] * H - (scalar_t)0.5, x = loc[2 * lp] * W - (scalar_t)0.5;
        if (y > -1 && x > -1 && y < H && x < W) msda_scatter(gv, H, W, row_stride, d, y, x, attn[lp] * g);
      }
    }
  }
}

extern "C" __global__ void ms_deform_attn_backward_sampling(
    const scalar_t* __restrict__ value, const scalar_t* __restrict__ grad_output,
    const long long* __restrict__ spatial_shapes, const long long* __restrict__ level_start_index,
    const scalar_t* __restrict__ sampling_locations, const scalar_t* __restrict__ attention_weights,
    scalar_t* __restrict__ grad_sampling_loc, scalar_t* __restrict__ grad_attn_weight,
    int B, int S, int M, int D, int Q, int L, int P) {
  const long long n = (long long)B * Q * M * L * P;
  const long long row_stride = (long long)M * D;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    const int lp = (int)(i % (L * P));
    const int l = lp / P;
    const long long bqm = i / (L * P);
    const int m = (int)(bqm % M);
    const int b = (int)(bqm / ((long long)Q * M));
    const int H = (int)spatial_shapes[2 * l], W = (int)spatial_shapes[2 * l + 1];
    const scalar_t y = sampling_locations[2 * i + 1] * H - (scalar_t)0.5;
    const scalar_t x = sampling_locations[2 * i] * W - (scalar_t)0.5;
    scalar_t g_w = 0, g_y = 0, g_x = 0;
    if (y > -1 && x > -1 && y < H && x < W) {
      const scalar_t* v = value + ((long long)b * S + level_start_index[l]) * row_stride + (long long)m * D;
      const scalar_t* g = grad_output + bqm * D;
      for (int d = 0; d < D; ++d) {
        scalar_t dv_dy, dv_dx;
        const scalar_t s = msda_bilinear(v, H, W, row_stride, d, y, x, &dv_dy, &dv_dx);
        g_w += g[d] * s;
        g_y += g[d] * dv_dy;
        g_x += g[d] * dv_dx;
      }
    }
    const scalar_t a = attention_weights[i];
    grad_attn_weight[i] = g_w;
    grad_sampling_loc[2 * i] = a * g_x * W;  // d(pixel x)/d(loc x) = W
    grad_sampling_loc[2 * i + 1] = a * g_y * H;
  }
}
