// Per-sample algebra of Anderson acceleration, shared by the CPU and CUDA code.
// The pure-PyTorch twin is deq_ext/reference.py (anderson_weights).
#pragma once

#include "history.h"

namespace deq_ext {

// Mixing weights of Anderson acceleration for one sample.
//
// With n stored residuals G_i and their Gram matrix K = [G_i . G_j], the weights
// minimise ||sum_i alpha_i G_i|| subject to sum_i alpha_i = 1. With a ridge
// term they are alpha = a / sum(a), where (K + lam * s I) a = 1 and s is the
// smallest positive diagonal entry of K (so lam is relative to the residuals' scale).
// K is SPD plus ridge, so a Cholesky factorisation is used. When it breaks
// down, or the weights are not finite, the weights fall
// back to the newest residual alone (a plain damped fixed-point step) and the
// function returns false so the caller can flag the sample. Breakdown is a pivot at
// or below 8 n u times its diagonal entry (u the unit roundoff): the rounding error of
// the elimination. A plain "pivot <= 0" test would decide a singular K by the sign of
// that error, which differs between hosts and GPUs (fused multiply-adds).
//
// gram: K with leading dimension ld (row i at gram + i * ld); work: n * n
// scratch; alpha: n outputs.
template <typename acc_t>
DEQ_HD bool anderson_weights(const acc_t* gram, int64_t ld, int64_t n, int64_t newest, double lam,
                             acc_t* work, acc_t* alpha) {
  // The smallest positive diagonal entry: residuals shrink by orders of magnitude
  // within the window, and a ridge on the scale of the largest would drown the newest.
  acc_t scale = 0;
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = gram[i * ld + i];
    ok = ok && is_finite(d);
    if (d > acc_t(0) && (scale == acc_t(0) || d < scale)) scale = d;
  }
  const acc_t ridge = static_cast<acc_t>(lam) * (scale > acc_t(0) ? scale : acc_t(1));
  // Cholesky: work holds L (lower triangle) of K + ridge I.
  for (int64_t j = 0; ok && j < n; ++j) {
    const acc_t diag = gram[j * ld + j] + ridge;
    acc_t d = diag;
    for (int64_t k = 0; k < j; ++k) d -= work[j * n + k] * work[j * n + k];
    if (!(d > acc_t(8 * n) * unit_roundoff<acc_t>() * diag) || !is_finite(d)) {
      ok = false;
      break;
    }
    const acc_t l = sqrt(d);
    work[j * n + j] = l;
    for (int64_t i = j + 1; i < n; ++i) {
      acc_t s = gram[i * ld + j];
      for (int64_t k = 0; k < j; ++k) s -= work[i * n + k] * work[j * n + k];
      work[i * n + j] = s / l;
    }
  }
  acc_t total = 0;
  if (ok) {
    // L y = 1, then L^T a = y; a is kept in alpha.
    for (int64_t i = 0; i < n; ++i) {
      acc_t s = 1;
      for (int64_t k = 0; k < i; ++k) s -= work[i * n + k] * alpha[k];
      alpha[i] = s / work[i * n + i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      acc_t s = alpha[i];
      for (int64_t k = i + 1; k < n; ++k) s -= work[k * n + i] * alpha[k];
      alpha[i] = s / work[i * n + i];
    }
    for (int64_t i = 0; i < n; ++i) total += alpha[i];
    ok = is_finite(total) && (total > smallest_normal<acc_t>() || total < -smallest_normal<acc_t>());
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc_t w = ok ? alpha[i] / total : acc_t(i == newest ? 1 : 0);
    alpha[i] = w;
    ok = ok && is_finite(w);
  }
  if (!ok) {
    for (int64_t i = 0; i < n; ++i) alpha[i] = acc_t(i == newest ? 1 : 0);
  }
  return ok;
}

}  // namespace deq_ext
