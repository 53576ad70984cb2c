// CPU kernels of fastkd::masked_pairwise_huber and its backward (schemas in csrc/ops.cpp), and the eager CPU autograd
// node (masked_pairwise_huber.h). Math in
// fastkd/kernels/masked_pairwise_huber_triton.py). Each group's members are read straight from the mask (no packing,
// no host sync), its unordered pairs i < j visited once (each stands for (i, j) and (j, i)), distances
// D_ij = sqrt(max(|x_i - x_j|^2, 1e-12)) from differences (no Gram-form cancellation). Groups run in parallel;
// every sum has a fixed order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include "masked_pairwise_huber.h"
#include "unit_gradient.h"

namespace fastkd::cpu {
namespace {

constexpr double kClamp = 1e-12;  // squared distances are clamped here before the sqrt (official code)

// One (G, N, D) input with a unit stride along D.
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t stride_g, stride_n, dim;

  Rows(const at::Tensor& x)
      : data(x.const_data_ptr<scalar_t>()), stride_g(x.stride(0)), stride_n(x.stride(1)), dim(x.size(2)) {}

  const scalar_t* row(int64_t g, int64_t n) const { return data + g * stride_g + n * stride_n; }

  template <typename acc_t>
  acc_t squared_distance(int64_t g, int64_t i, int64_t j) const {
    const scalar_t* a = row(g, i);
    const scalar_t* b = row(g, j);
    acc_t sum = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const acc_t u = static_cast<acc_t>(a[d]) - static_cast<acc_t>(b[d]);
      sum += u * u;
    }
    return sum;
  }
};

at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(2) == 1 ? x : x.contiguous(); }

// Member positions of group g.
std::vector<int64_t> members(const at::Tensor& mask, int64_t g) {
  const bool* m = mask.const_data_ptr<bool>() + g * mask.stride(0);
  std::vector<int64_t> out;
  for (int64_t n = 0; n < mask.size(1); ++n) {
    if (m[n * mask.stride(1)]) out.push_back(n);
  }
  return out;
}

// Weight of each group's loss in the reduced loss: "official" 1 / n_g, "mean" 1 / (ordered pairs), else 1;
// 0 for groups under 2 members.
std::vector<double> group_scales(const std::vector<int64_t>& counts, c10::string_view reduction) {
  double pairs = 0;
  for (int64_t n : counts) pairs += n >= 2 ? static_cast<double>(n * (n - 1)) : 0.0;
  std::vector<double> scale(counts.size());
  for (size_t g = 0; g < counts.size(); ++g) {
    const int64_t n = counts[g];
    scale[g] = n < 2 ? 0.0 : reduction == "official" ? 1.0 / n : reduction == "mean" ? 1.0 / std::max(pairs, 1.0) : 1.0;
  }
  return scale;
}

template <typename acc_t>
acc_t huber_slope(acc_t u, double delta) {
  return std::clamp(u, static_cast<acc_t>(-delta), static_cast<acc_t>(delta));
}

int64_t grain(const at::Tensor& student, const at::Tensor& teacher) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, student.size(1) * (student.size(2) + teacher.size(2))));
}

}  // namespace

namespace {

// Adds w (slope(D_s / m_s - D_t / m_t) - c) / (m_s D_s) (x_i - x_j) to row i and subtracts it from row j, over the
// unordered pairs of one group's members idx (the gradient of the group's loss times w / 2), into acc (n x D).
template <typename scalar_t, typename acc_t>
void add_group_gradient(const Rows<scalar_t>& s_rows, const Rows<scalar_t>& t_rows, int64_t g,
                        const std::vector<int64_t>& idx, acc_t m_s, acc_t m_t, acc_t coef, acc_t w, double delta,
                        std::vector<acc_t>& acc) {
  const int64_t n = static_cast<int64_t>(idx.size()), D = s_rows.dim;
  acc.assign(n * D, acc_t(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i + 1; j < n; ++j) {
      const acc_t d2 = s_rows.template squared_distance<acc_t>(g, idx[i], idx[j]);
      if (d2 < acc_t(kClamp)) continue;  // no gradient through the clamp
      const acc_t d_s = std::sqrt(d2);
      const acc_t d_t = std::sqrt(std::max(t_rows.template squared_distance<acc_t>(g, idx[i], idx[j]), acc_t(kClamp)));
      const acc_t weight = w * (huber_slope(d_s / m_s - d_t / m_t, delta) - coef) / (m_s * d_s);
      const scalar_t* x_i = s_rows.row(g, idx[i]);
      const scalar_t* x_j = s_rows.row(g, idx[j]);
      for (int64_t d = 0; d < D; ++d) {
        const acc_t diff = weight * (static_cast<acc_t>(x_i[d]) - static_cast<acc_t>(x_j[d]));
        acc[i * D + d] += diff;
        acc[j * D + d] -= diff;
      }
    }
  }
}

// Writes a group's gradient rows (acc, n x D) to its members' rows of out.
template <typename scalar_t, typename acc_t>
void store_group_gradient(const std::vector<acc_t>& acc, const std::vector<int64_t>& idx, int64_t g, int64_t D,
                          at::Tensor& out) {
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  for (size_t i = 0; i < idx.size(); ++i) {
    scalar_t* row = o + g * out.stride(0) + idx[i] * out.stride(1);
    for (int64_t d = 0; d < D; ++d) row[d * out.stride(2)] = static_cast<scalar_t>(acc[i * D + d]);
  }
}

std::vector<int64_t> member_counts(const at::Tensor& mask) {
  std::vector<int64_t> counts(mask.size(0));
  for (int64_t g = 0; g < mask.size(0); ++g) counts[g] = static_cast<int64_t>(members(mask, g).size());
  return counts;
}

// (loss, stats (G, 3) [m_s, m_t, c]) and, when with_grad, d loss / d student for an upstream gradient of 1
// (zeros outside the groups' members) in the same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_pass(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                            const at::Tensor& mask_in, double delta, bool normalize,
                                                            c10::string_view reduction, double mean_floor,
                                                            bool with_grad) {
  const at::Tensor student = unit_last_stride(student_in), teacher = unit_last_stride(teacher_in);
  const at::Tensor mask = mask_in.to(at::kBool);
  const int64_t G = student.size(0), D = student.size(2);
  const auto acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor stats = at::empty({G, 3}, student.options().dtype(acc_type));
  at::Tensor grad = with_grad ? at::zeros_like(student_in) : at::Tensor();
  std::vector<double> losses(G);
  const std::vector<double> scale = group_scales(member_counts(mask), reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "masked_pairwise_huber", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<scalar_t> s_rows(student), t_rows(teacher);
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    at::parallel_for(0, G, grain(student, teacher), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> d_s, d_t, acc;
      for (int64_t g = begin; g < end; ++g) {
        const std::vector<int64_t> idx = members(mask, g);
        const int64_t n = static_cast<int64_t>(idx.size());
        d_s.clear();
        d_t.clear();
        acc_t sum_s = 0, sum_t = 0;
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = i + 1; j < n; ++j) {
            d_s.push_back(std::sqrt(std::max(s_rows.template squared_distance<acc_t>(g, idx[i], idx[j]), acc_t(kClamp))));
            d_t.push_back(std::sqrt(std::max(t_rows.template squared_distance<acc_t>(g, idx[i], idx[j]), acc_t(kClamp))));
            sum_s += 2 * d_s.back();
            sum_t += 2 * d_t.back();
          }
        }
        acc_t m_s = 1, m_t = 1;
        bool mean_in_graph = false;
        if (normalize && n >= 2) {
          const acc_t pairs = static_cast<acc_t>(n * (n - 1));
          m_s = std::max(sum_s / pairs, static_cast<acc_t>(mean_floor));
          m_t = std::max(sum_t / pairs, static_cast<acc_t>(mean_floor));
          mean_in_graph = sum_s / pairs > static_cast<acc_t>(mean_floor);
        }
        acc_t loss = 0, slope_ds = 0;
        for (size_t p = 0; p < d_s.size(); ++p) {
          const acc_t u = d_s[p] / m_s - d_t[p] / m_t;
          const acc_t a = std::abs(u);
          loss += 2 * (a <= delta ? acc_t(0.5) * u * u : static_cast<acc_t>(delta) * (a - acc_t(0.5 * delta)));
          slope_ds += 2 * huber_slope(u, delta) * d_s[p];
        }
        losses[g] = static_cast<double>(loss);
        st[3 * g] = m_s;
        st[3 * g + 1] = m_t;
        st[3 * g + 2] = mean_in_graph ? slope_ds / std::max(sum_s, acc_t(1e-30)) : acc_t(0);
        if (with_grad && n >= 2 && scale[g] != 0) {  // 2: the pairs (i, j) and (j, i)
          add_group_gradient(s_rows, t_rows, g, idx, m_s, m_t, st[3 * g + 2], static_cast<acc_t>(2 * scale[g]),
                             delta, acc);
          store_group_gradient<scalar_t>(acc, idx, g, D, grad);
        }
      }
    });
  });
  if (reduction == "none") {
    at::Tensor out = at::empty({G}, at::kDouble);
    double* o = out.mutable_data_ptr<double>();
    for (int64_t g = 0; g < G; ++g) o[g] = losses[g] * scale[g];
    return {out.to(student.scalar_type()), stats, grad};
  }
  double total = 0;  // fixed order
  for (int64_t g = 0; g < G; ++g) total += losses[g] * scale[g];
  return {at::scalar_tensor(total, student.options()), stats, grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_pairwise_huber(const at::Tensor& student, const at::Tensor& teacher,
                                                          const at::Tensor& mask, double delta, bool normalize,
                                                          c10::string_view reduction, double mean_floor) {
  auto [loss, stats, unused] = forward_pass(student, teacher, mask, delta, normalize, reduction, mean_floor, false);
  return {loss, stats};
}

at::Tensor masked_pairwise_huber_backward(const at::Tensor& grad, const at::Tensor& student_in,
                                          const at::Tensor& teacher_in, const at::Tensor& mask_in,
                                          const at::Tensor& stats_in, double delta, c10::string_view reduction) {
  const at::Tensor student = unit_last_stride(student_in), teacher = unit_last_stride(teacher_in);
  const at::Tensor mask = mask_in.to(at::kBool);
  const int64_t G = student.size(0), D = student.size(2);
  // the stats come from the forward in the accumulation dtype, the upstream gradient is a scalar or (G,): both
  // read in place (no conversion ops: at the papers' sizes each costs as much as the kernel)
  const auto acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor stats = stats_in.to(acc_type).contiguous();
  const at::Tensor upstream_in = grad.to(acc_type).contiguous();
  const bool grad_is_scalar = upstream_in.numel() == 1;
  const std::vector<double> scale = group_scales(member_counts(mask), reduction);
  at::Tensor out = at::zeros_like(student_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "masked_pairwise_huber_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<scalar_t> s_rows(student), t_rows(teacher);
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* upstream = upstream_in.const_data_ptr<acc_t>();
    at::parallel_for(0, G, grain(student, teacher), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc;
      for (int64_t g = begin; g < end; ++g) {
        const std::vector<int64_t> idx = members(mask, g);
        if (idx.size() < 2 || scale[g] == 0) continue;
        const double upstream_g = static_cast<double>(upstream[grad_is_scalar ? 0 : g]);
        add_group_gradient(s_rows, t_rows, g, idx, st[3 * g], st[3 * g + 1], st[3 * g + 2],
                           static_cast<acc_t>(2 * upstream_g * scale[g]), delta, acc);  // 2: (i, j) and (j, i)
        store_group_gradient<scalar_t>(acc, idx, g, D, out);
      }
    });
  });
  return out;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The eager CPU autograd node: forward = loss and the student's gradient in one pass (each term); backward = gradient
// x upstream (0-dim, or per group for reduction "none").
struct MaskedPairwiseHuber : torch::autograd::Function<MaskedPairwiseHuber> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& mask, double delta, bool normalize, c10::string_view reduction,
                            double mean_floor, double weight, double transposed_weight) {
    TORCH_CHECK(reduction != "none" || transposed_weight == 0,
                "reduction 'none' gives one loss per group: it needs transposed_weight == 0");
    at::Tensor loss, grad;
    if (weight != 0) {
      auto [term, stats, term_grad] =
          forward_pass(student, teacher, mask, delta, normalize, reduction, mean_floor, true);
      loss = weight == 1 ? term : term * weight;
      grad = weight == 1 ? term_grad : term_grad * weight;
    }
    if (transposed_weight != 0) {
      auto [term, stats, term_grad] = forward_pass(
          student.transpose(0, 1), teacher.transpose(0, 1), mask.t(), delta, normalize, reduction, mean_floor, true);
      term = term * transposed_weight;
      term_grad = term_grad.transpose(0, 1) * transposed_weight;
      loss = loss.defined() ? loss + term : term;
      grad = grad.defined() ? grad + term_grad : term_grad;
    }
    if (!loss.defined()) {  // both weights 0
      loss = at::zeros(reduction == "none" ? at::IntArrayRef{student.size(0)} : at::IntArrayRef{}, student.options());
      grad = at::zeros_like(student);
    }
    ctx->saved_data["per_group"] = reduction == "none";
    ctx->save_for_backward({grad});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor stored = ctx->get_saved_variables()[0];
    if (!is_unit_gradient(grads[0])) {  // unit_gradient.h
      stored = stored * (ctx->saved_data["per_group"].toBool() ? grads[0].reshape({-1, 1, 1}) : grads[0]);
    }
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiating this gradient raises, as in
                                       // fastkd/ops/differentiable_once.py
      auto error = std::make_shared<torch::autograd::DelayedError>(
          "fastkd's masked_pairwise_huber is differentiable once: its gradient has no gradient (create_graph=True)",
          1);
      stored = (*error)({stored.detach().requires_grad_()})[0];
    }
    return {stored, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor masked_pairwise_huber_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& mask, double delta, bool normalize,
                                          c10::string_view reduction, double mean_floor, double weight,
                                          double transposed_weight) {
  return MaskedPairwiseHuber::apply(student, teacher, mask, delta, normalize, reduction, mean_floor, weight,
                                    transposed_weight);
}

}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("masked_pairwise_huber", &fastkd::cpu::masked_pairwise_huber);
  m.impl("masked_pairwise_huber_backward", &fastkd::cpu::masked_pairwise_huber_backward);
}
