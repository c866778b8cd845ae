// Per-element math of NovoGrad, shared by the CPU (g++) and CUDA (nvcc) kernels. No torch headers.
//
// This mirrors NOTE: [the kernel seam] in novograd_ds/kernels/__init__.py, one expression per line, in the
// order the reference backend (novograd_ds/kernels/reference.py) evaluates them, each product and sum rounded
// separately (no FMA contraction), so a kernel reproduces the reference to the last bit in fp32:
//
//     gh = g / d                          d = sqrt(v) + eps of the element's layer, computed in Python
//     gh = gh + wd * w                    unless decoupled
//     m  = a1 * m + c1 * gh               a1, c1 = step_factors(k, ...): 0, 1 on a layer's first step
//     u  = m + wd * w                     if decoupled (w before the step), else u = m
//     w  = w - lr * u
//
// Every scalar comes from Python on each call; kernels hold no state.
#pragma once

#if defined(__CUDACC__)
#define NOVOGRAD_HD __host__ __device__ __forceinline__
#else
#define NOVOGRAD_HD inline
#endif

namespace novograd {

// The scalars of one update call, identical for every element (the denominator is per layer).
struct UpdateScalars {
  float lr;         // learning rate
  float a1;         // beta1 factor of m (0 on a layer's first step)
  float c1;         // grad scale of gh in m (1 - beta1 with grad_averaging, else 1; 1 on the first step)
  float wd;         // weight decay
  int decoupled;    // 1: w -= lr * (m + wd * w); 0: wd * w is added to the normalised gradient
};

// One element of the fused update. `g` is already widened to fp32; `w` and `m` are updated in place.
NOVOGRAD_HD void update_element(float g, float& w, float& m, float d, const UpdateScalars& s) {
  float gh = g / d;                              // gh = g / (sqrt(v) + eps)
  if (!s.decoupled) gh = gh + s.wd * w;          // gh = gh + wd*w            (L2, not decoupled)
  const float m_new = s.a1 * m + s.c1 * gh;      // m  = b1*m + c*gh          (0*m + 1*gh on step 1)
  const float u = s.decoupled ? m_new + s.wd * w // u  = m + wd*w             (decoupled, w before the step)
                              : m_new;           // u  = m                    (otherwise)
  w = w - s.lr * u;                              // w  = w - lr*u
  m = m_new;
}

// One element's contribution to the layer's squared norm, n = sum(g*g), accumulated by the caller in fp32+.
NOVOGRAD_HD float square(float g) { return g * g; }

}  // namespace novograd
