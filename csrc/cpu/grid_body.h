// The "mse" grid search (GridArgs, kernels.h), written once over per-ISA float lanes: one group per lane, so
// that each group's sums stay in its lane and its candidates' float16 scales and zero points are vector code.
//
// Included by kernel_body.h. Isa::Grid provides, for vectors V of kLanes floats and masks M:
//   set1, load, add, sub, mul, div, neg        the obvious operations (load: kLanes floats)
//   quotient(a, b, r)                          a / b rounded as div rounds it, given r = div(1, b), for b a
//                                              float16 value or 15/7 (the divisors of the passes over columns)
//   min(a, b), max(a, b)                       a < b ? a : b and a > b ? a : b (x86's minps / maxps, as torch's
//                                              clamp uses them: b on ties of zeros and on NaN)
//   round(V)                                   the nearest integer, ties to even (torch.round)
//   fp16(V)                                    the nearest float16, ties to even, overflow to infinity, as float
//   store_halves(uint16_t*, V)                 float16 bits of values that are float16 already
//   lt, gt(V, V) -> M                          ordered comparisons (false where either is NaN)
//   unordered(V, V) -> M                       where either is NaN
//   both, either(M, M), finite(V) -> M, all(M) -> bool, select(M, a, b): a's lanes where M holds, b's elsewhere
//
// Every step is the float32 operation of the reference (lowbit.quantize._mse_grid) in its order, each quotient
// rounded as a division rounds it (-ffp-contract=off keeps a * b + c two roundings), and the sums over a group's
// columns are added in the order torch adds them (column_sum): the codes, fits, float16 roundings and choices of
// the reference, bit for bit where torch sums as its x86 kernels do.
#pragma once

namespace grid {

using G = Isa::Grid;
using V = G::V;
constexpr int kLanes = G::kLanes;
static_assert(kGridBlock % kLanes == 0, "a kernel block holds whole vectors of groups");
constexpr float kSmallestHalf = 1.0f / 16777216.0f;  // float16's smallest subnormal, 2^-24

inline V clamp(V v, V lo, V hi) { return G::min(hi, G::max(lo, v)); }  // as torch's clamp

// A candidate grid as the passes over columns take it: scale, its reciprocal, zero point, largest code.
struct Candidate {
  V s, inv_s, z, top;
};

// A column's step on the grid: its code (round_to_grid), or an odd int3.5 column's (kThreeBit) 3-bit code in
// 15/7 steps (grid_steps).
template <bool kThreeBit>
inline V step_of(V x, const Candidate& g) {
  const V t = G::add(G::quotient(x, g.s, g.inv_s), g.z);
  if constexpr (kThreeBit) {
    const V step3 = G::set1(kStep3);
    const V code = G::round(G::quotient(t, step3, G::set1(1.0f / kStep3)));
    return G::mul(clamp(code, G::set1(0.0f), G::set1(7.0f)), step3);
  } else {
    return clamp(G::round(t), G::set1(0.0f), g.top);
  }
}

// One grid's least-squares sums over the columns (w: a column's weight): w step, w step^2, w step x.
struct FitSums {
  V step, step2, x;
};

inline V plus(V a, V b) { return G::add(a, b); }
inline FitSums plus(const FitSums& a, const FitSums& b) {
  return {G::add(a.step, b.step), G::add(a.step2, b.step2), G::add(a.x, b.x)};
}

// ATen's float vectors on x86: 8 floats (AVX2; AVX-512 CPUs run the AVX2 sum kernel too).
constexpr int64_t kTorchSumWidth = 8;

// The sum of term(c) over a group's columns c < L, added in the order of torch's .sum(-1) over a contiguous
// float32 row (ATen's cascade_sum): first the columns past the last whole vector, then per vector lane i the
// lane's four accumulators k (vectors 4t + k; the vectors left over go to the first), added in turn. Rows under
// one vector are one lane of one-column vectors. (From 512 columns on, more than any lowbit group has, ATen adds
// in further levels that this does not reproduce.)
template <typename Acc, typename Term>
Acc column_sum(int64_t L, Acc zero, Term term) {
  const int64_t width = L < kTorchSumWidth ? 1 : kTorchSumWidth;
  const int64_t vectors = L / width, per_acc = vectors / 4;
  Acc total = zero;
  for (int64_t c = vectors * width; c < L; ++c) total = plus(total, term(c));
  for (int64_t i = 0; i < width; ++i) {
    Acc lane = zero;
    for (int64_t k = 0; k < 4; ++k) {
      Acc acc = zero;
      for (int64_t t = 0; t < per_acc; ++t) acc = plus(acc, term((4 * t + k) * width + i));
      if (k == 0)
        for (int64_t v = 4 * per_acc; v < vectors; ++v) acc = plus(acc, term(v * width + i));
      lane = k == 0 ? acc : plus(lane, acc);
    }
    total = plus(total, lane);
  }
  return total;
}

// Column c's step on the grid from the vectors of groups x [L][kLanes]: int3.5's odd columns are 3-bit.
template <bool kInt35>
inline V column_step(const float* x, int64_t c, const Candidate& g) {
  const V xv = G::load(x + c * kLanes);
  return kInt35 && c % 2 ? step_of<true>(xv, g) : step_of<false>(xv, g);
}

// v times column c's weights wt [L][kLanes]; unweighted, every weight is 1 and the product v itself.
template <bool kWeighted>
inline V times_weight(V v, const float* wt, int64_t c) {
  if constexpr (kWeighted) return G::mul(v, G::load(wt + c * kLanes));
  else return v;
}

template <bool kInt35, bool kWeighted>
FitSums fit_sums(const float* x, const float* wt, int64_t L, const Candidate& g) {
  const V zero = G::set1(0.0f);
  return column_sum(L, FitSums{zero, zero, zero}, [&](int64_t c) {
    const V step = column_step<kInt35>(x, c, g);
    const V weighted = times_weight<kWeighted>(step, wt, c);
    return FitSums{weighted, G::mul(weighted, step), G::mul(weighted, G::load(x + c * kLanes))};
  });
}

// The weighted squared error: the sum of w ((step - z) s - x)^2.
template <bool kInt35, bool kWeighted>
V error_sum(const float* x, const float* wt, int64_t L, const Candidate& g) {
  return column_sum(L, G::set1(0.0f), [&](int64_t c) {
    const V diff = G::sub(G::mul(G::sub(column_step<kInt35>(x, c, g), g.z), g.s), G::load(x + c * kLanes));
    return times_weight<kWeighted>(G::mul(diff, diff), wt, c);
  });
}

// The search for one vector of groups x, with column weights wt where kWeighted (both [L][kLanes]): the best grid
// into s, z; false when a min-max scale overflows float16.
template <bool kInt35, bool kWeighted>
bool search(const GridArgs& a, const float* x, const float* wt, V& best_s, V& best_z) {
  const int64_t L = a.L;
  const V zero = G::set1(0.0f), one = G::set1(1.0f), top = G::set1(a.top);
  // The range [min(w, 0), max(w, 0)]; NaN where a weight is NaN, as torch's amin and amax give it (the reference
  // then returns NaN scales and zero points).
  V lo = G::load(x), hi = lo;
  auto has_nan = G::unordered(lo, lo);
  for (int64_t c = 1; c < L; ++c) {
    const V xv = G::load(x + c * kLanes);
    lo = G::min(xv, lo);
    hi = G::max(xv, hi);
    has_nan = G::either(has_nan, G::unordered(xv, xv));
  }
  const V nan = G::set1(__builtin_nanf(""));
  lo = G::select(has_nan, nan, G::min(zero, lo));
  hi = G::select(has_nan, nan, G::max(zero, hi));
  const V n = kWeighted ? column_sum(L, zero, [&](int64_t c) { return G::load(wt + c * kLanes); })  // total weight
                        : G::set1(static_cast<float>(L));
  const V sum_xw = column_sum(L, zero, [&](int64_t c) {  // of w x
    return times_weight<kWeighted>(G::load(x + c * kLanes), wt, c);
  });

  bool in_range = true;
  // _minmax_grid of the range [lo, hi].
  const auto minmax = [&](V range_lo, V range_hi, V& s, V& z) {
    s = G::fp16(G::div(G::sub(range_hi, range_lo), top));
    in_range = in_range && G::all(G::either(G::finite(s), G::unordered(s, s)));  // not infinite
    s = G::max(G::set1(kSmallestHalf), s);  // all-zero groups too get a usable scale
    z = G::div(G::neg(range_lo), s);
    if (a.integer_zeros) z = clamp(G::round(z), zero, top);
    z = G::fp16(z);
  };
  // _refit: the weighted least-squares scale and offset of w ~ (step - z) s; a fit whose scale is not a positive
  // finite float16 keeps the old scale, one whose zero point is not finite keeps both.
  const auto refit = [&](V& s, V& z) {
    const FitSums f = fit_sums<kInt35, kWeighted>(x, wt, L, Candidate{s, G::div(one, s), z, top});
    const V det = G::sub(G::mul(n, f.step2), G::mul(f.step, f.step));
    const auto solvable = G::gt(det, zero);
    const V slope = G::div(G::sub(G::mul(n, f.x), G::mul(f.step, sum_xw)), G::select(solvable, det, one));
    V fit_s = G::fp16(slope);
    fit_s = G::select(G::both(solvable, G::both(G::gt(fit_s, zero), G::finite(fit_s))), fit_s, s);
    V fit_z = G::div(G::sub(f.step, G::div(sum_xw, fit_s)), n);
    if (a.integer_zeros) fit_z = clamp(G::round(fit_z), zero, top);
    fit_z = G::fp16(fit_z);
    const auto finite = G::finite(fit_z);
    s = G::select(finite, fit_s, s);
    z = G::select(finite, fit_z, z);
  };

  V s, z;
  minmax(lo, hi, s, z);
  V best_error = error_sum<kInt35, kWeighted>(x, wt, L, Candidate{s, G::div(one, s), z, top});
  best_s = s;
  best_z = z;
  for (int64_t r = 0; r < a.n_ratios; ++r) {
    const V ratio = G::set1(a.ratios[r]);
    minmax(G::mul(lo, ratio), G::mul(hi, ratio), s, z);
    for (int64_t i = 0; i < a.refits; ++i) refit(s, z);
    const V error = error_sum<kInt35, kWeighted>(x, wt, L, Candidate{s, G::div(one, s), z, top});
    const auto better = G::lt(error, best_error);  // strictly: on a tie the earlier candidate stays
    best_error = G::select(better, error, best_error);
    best_s = G::select(better, s, best_s);
    best_z = G::select(better, z, best_z);
  }
  return in_range;
}

// One vector of groups (and their column weights, if any) into x and wt [L][kLanes]: column c of lane j's group
// at c * kLanes + j. Lanes past the last group get a group of zeros.
void gather_lanes(const GridArgs& a, int64_t i0, int64_t count, float* x, float* wt) {
  for (int64_t j = 0; j < kLanes; ++j) {
    if (j < count) {
      const float* group = a.groups + (i0 + j) * a.L;
      for (int64_t c = 0; c < a.L; ++c) x[c * kLanes + j] = group[c];
      if (a.weight) {
        const float* weight = a.weight + (i0 + j) % a.P * a.L;
        for (int64_t c = 0; c < a.L; ++c) wt[c * kLanes + j] = weight[c];
      }
    } else {
      for (int64_t c = 0; c < a.L; ++c) x[c * kLanes + j] = 0.0f;
      if (a.weight)
        for (int64_t c = 0; c < a.L; ++c) wt[c * kLanes + j] = 1.0f;
    }
  }
}

template <bool kInt35, bool kWeighted>
bool search_range(const GridArgs& a, int64_t begin, int64_t end, float* scratch) {
  float* x = scratch;
  float* wt = scratch + a.L * kLanes;
  bool in_range = true;
  for (int64_t i0 = begin; i0 < end; i0 += kLanes) {
    const int64_t count = end - i0 < kLanes ? end - i0 : kLanes;
    gather_lanes(a, i0, count, x, wt);
    V s, z;
    in_range = search<kInt35, kWeighted>(a, x, wt, s, z) && in_range;
    alignas(64) uint16_t s_bits[kLanes], z_bits[kLanes];
    G::store_halves(s_bits, s);
    G::store_halves(z_bits, z);
    for (int64_t j = 0; j < count; ++j) {
      a.scales[i0 + j] = s_bits[j];
      a.zeros[i0 + j] = z_bits[j];
    }
  }
  return in_range;
}

}  // namespace grid

bool mse_grid(const GridArgs& a, int64_t begin, int64_t end, float* scratch) {
  using grid::search_range;
  if (a.int35) return a.weight ? search_range<true, true>(a, begin, end, scratch)
                               : search_range<true, false>(a, begin, end, scratch);
  return a.weight ? search_range<false, true>(a, begin, end, scratch)
                  : search_range<false, false>(a, begin, end, scratch);
}
