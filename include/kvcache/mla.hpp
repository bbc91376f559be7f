// SPDX-License-Identifier: Apache-2.0
// Multi-head latent attention (MLA, DeepSeek-V2): a cache of one compressed latent row per token
// and layer, and decode by weight absorption over it, with the naive decompressing oracle.
#pragma once

#include "kvcache/attention/batch.hpp"
#include "kvcache/attention/decode.hpp"
#include "kvcache/attention/reference.hpp"
#include "kvcache/cache.hpp"
#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/paged/cache.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/types.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace kvcache {

/// The sizes of one MLA layer (DeepSeek-V2, arXiv 2405.04434, section 2.1; the names of its
/// Hugging Face config in brackets). Per token, the cache holds one row of
/// latent_dim() = kv_lora_rank + rope_dim elements per layer: the compressed latent c_kv
/// [kv_lora_rank] and the decoupled RoPE key k_pe [qk_rope_head_dim], shared by every head.
/// Query head h is [q_nope_h | q_pe_h] (qk_nope_dim + rope_dim); its key would be
/// [W_UK_h c_kv | k_pe] and its value W_UV_h c_kv (v_head_dim), but neither is ever formed:
///
///   score_h(t) = q_nope_h . (W_UK_h c_t) + q_pe_h . k_pe_t = (W_UK_h^T q_nope_h) . c_t + q_pe_h . k_pe_t
///   out_h      = sum_t p_h(t) W_UV_h c_t = W_UV_h (sum_t p_h(t) c_t)
///
/// so decode is multi-query attention with one kv head whose key is the latent row, whose value
/// is its first kv_lora_rank columns, and whose query for head h is
/// [W_UK_h^T q_nope_h | q_pe_h] (FlashMLA's formulation). The softmax scale stays the
/// original head's, 1 / sqrt(qk_nope_dim + rope_dim).
///
/// DeepSeek-V2: 128 heads, kv_lora_rank 512, qk_nope_dim 128, rope_dim 64, v_head_dim 128:
/// 576 elements per token and layer, where the MHA it replaces caches 2 x 128 x 128 = 32768.
///
/// A cache of shape cache(n_layers) holds latent_dim() elements a token and layer in its
/// format, so its bytes() is kv_latent_cache_bytes(1, tokens, n_layers, kv_lora_rank,
/// rope_dim, dtype) (memory.hpp). Quantized, rows are grouped as keys (per channel over groups
/// of tokens) where the formula groups channels per token: the two agree when the group
/// divides kv_lora_rank and rope_dim (32 or 64 at 512 and 64), and as for every quantized
/// cache, the newest partial group waits in float.
class mla_shape {
 public:
  /// Throws std::invalid_argument unless n_heads, kv_lora_rank, qk_nope_dim and v_head_dim are
  /// positive and rope_dim >= 0; std::length_error when the widths overflow.
  mla_shape(Index n_heads, Index kv_lora_rank, Index qk_nope_dim, Index rope_dim,
            Index v_head_dim)
      : n_heads_(n_heads), rank_(kv_lora_rank), nope_(qk_nope_dim), rope_(rope_dim),
        v_dim_(v_head_dim) {
    if (n_heads < 1 || kv_lora_rank < 1 || qk_nope_dim < 1 || v_head_dim < 1 || rope_dim < 0) {
      detail::fail<std::invalid_argument>(
          "mla_shape: n_heads, kv_lora_rank, qk_nope_dim and v_head_dim must be positive and "
          "rope_dim >= 0, got ", n_heads, ", ", kv_lora_rank, ", ", qk_nope_dim, ", ", v_head_dim,
          " and ", rope_dim);
    }
    const Index latent = detail::checked_add(kv_lora_rank, rope_dim, "mla_shape: latent_dim");
    const Index head = detail::checked_add(qk_nope_dim, rope_dim, "mla_shape: query head");
    detail::checked_product({n_heads, std::max({latent, head, v_head_dim})}, "mla_shape: width");
    // Every per-token size of the absorbed attention fits, as attention_shape checks.
    (void)attention();
  }

  Index n_heads() const noexcept { return n_heads_; }
  /// Width of the compressed latent c_kv (kv_lora_rank), the value of the absorbed attention.
  Index kv_lora_rank() const noexcept { return rank_; }
  /// Width of each head's query and key without RoPE (qk_nope_head_dim).
  Index qk_nope_dim() const noexcept { return nope_; }
  /// Width of the decoupled RoPE query and key (qk_rope_head_dim).
  Index rope_dim() const noexcept { return rope_; }
  /// Width of each head's value and output (v_head_dim).
  Index v_head_dim() const noexcept { return v_dim_; }
  /// Width of one cached row: kv_lora_rank + rope_dim.
  Index latent_dim() const noexcept { return rank_ + rope_; }
  /// Width of a token's queries: n_heads * (qk_nope_dim + rope_dim), heads side by side, each
  /// [q_nope | q_pe].
  Index q_width() const noexcept { return n_heads_ * (nope_ + rope_); }
  /// Width of a token's attention output before the output projection: n_heads * v_head_dim.
  Index out_width() const noexcept { return n_heads_ * v_dim_; }
  /// The original head's softmax scale, 1 / sqrt(qk_nope_dim + rope_dim), which the absorbed
  /// attention keeps (not 1 / sqrt(latent_dim)).
  double scale() const noexcept { return 1.0 / std::sqrt(double(nope_ + rope_)); }

  /// The absorbed attention: n_heads query heads of latent_dim over one kv head of latent_dim
  /// whose values are its first kv_lora_rank columns.
  attention_shape attention() const {
    return attention_shape(n_heads_, 1, rank_ + rope_).with_values_in_keys(rank_);
  }
  /// The shape of a cache of `n_layers` MLA layers: one latent row per token and layer. Throws
  /// as cache_shape does.
  cache_shape cache(Index n_layers) const { return cache_shape(n_layers, attention()); }

  friend bool operator==(const mla_shape& a, const mla_shape& b) noexcept {
    return a.n_heads_ == b.n_heads_ && a.rank_ == b.rank_ && a.nope_ == b.nope_ &&
           a.rope_ == b.rope_ && a.v_dim_ == b.v_dim_;
  }
  friend bool operator!=(const mla_shape& a, const mla_shape& b) noexcept { return !(a == b); }

 private:
  Index n_heads_, rank_, nope_, rope_, v_dim_;
};

namespace detail {
template <class T>
void check_mla_weights(const char* fn, const mla_shape& s, const Eigen::Ref<const row_matrix<T>>& w_uk,
                       const Eigen::Ref<const row_matrix<T>>& w_uv) {
  if (w_uk.rows() != s.n_heads() * s.qk_nope_dim() || w_uk.cols() != s.kv_lora_rank()) {
    fail<std::invalid_argument>(fn, ": w_uk is ", w_uk.rows(), " x ", w_uk.cols(),
                                ", expected n_heads*qk_nope_dim x kv_lora_rank = ",
                                s.n_heads() * s.qk_nope_dim(), " x ", s.kv_lora_rank());
  }
  if (w_uv.rows() != s.n_heads() * s.v_head_dim() || w_uv.cols() != s.kv_lora_rank()) {
    fail<std::invalid_argument>(fn, ": w_uv is ", w_uv.rows(), " x ", w_uv.cols(),
                                ", expected n_heads*v_head_dim x kv_lora_rank = ",
                                s.n_heads() * s.v_head_dim(), " x ", s.kv_lora_rank());
  }
}

template <class Q, class Out>
void check_mla_rows(const char* fn, const mla_shape& s, const Q& q, const Out& out) {
  if (q.cols() != s.q_width()) {
    fail<std::invalid_argument>(fn, ": q has ", q.cols(),
                                " columns, expected n_heads*(qk_nope_dim + rope_dim) = ",
                                s.q_width());
  }
  if (out.rows() != q.rows() || out.cols() != s.out_width()) {
    fail<std::invalid_argument>(fn, ": out is ", out.rows(), " x ", out.cols(), ", expected ",
                                q.rows(), " x n_heads*v_head_dim = ", s.out_width());
  }
}

// The options of the absorbed attention: the original head's scale unless one is given.
inline attention_options mla_options(const mla_shape& s, attention_options opt) {
  if (opt.scale == 0.0) opt.scale = s.scale();
  return opt;
}
}  // namespace detail

/// Scratch of the MLA attention functions: the absorbed queries, the latent outputs and the
/// attention workspace. Reusing one makes decode allocation free after the first call of the
/// largest size. One call at a time (see attention_workspace); copies start empty.
template <class T>
struct mla_workspace {
  attention_workspace<T> attention;
  row_matrix<T> q_latent;  // [token][n_heads * latent_dim] absorbed queries
  row_matrix<T> o_latent;  // [token][n_heads * kv_lora_rank] attention over the latents

  /// Sizes the query and output scratch for `rows` tokens. Allocates only when it grows.
  void prepare(const mla_shape& s, Index rows) {
    const Index qw = s.n_heads() * s.latent_dim(), ow = s.n_heads() * s.kv_lora_rank();
    if (q_latent.rows() < rows || q_latent.cols() != qw) q_latent.resize(rows, qw);
    if (o_latent.rows() < rows || o_latent.cols() != ow) o_latent.resize(rows, ow);
  }
};

/// Weight absorption of queries: row i of `q` (`n x n_heads*(qk_nope_dim + rope_dim)`, each
/// head [q_nope | q_pe]) becomes row i of `q_latent` (`n x n_heads*latent_dim`), each head
/// [W_UK_h^T q_nope_h | q_pe_h]. `w_uk` is `n_heads*qk_nope_dim x kv_lora_rank` (DeepSeek-V2's
/// kv_b_proj rows of the no-RoPE keys, head after head, as PyTorch stores a Linear: k = W c).
/// Cost: n x n_heads x qk_nope_dim x kv_lora_rank multiply-adds. Throws std::invalid_argument
/// when a size does not fit.
template <class T>
void mla_absorb_queries(const mla_shape& s, const Eigen::Ref<const row_matrix<T>>& w_uk,
                        const Eigen::Ref<const row_matrix<T>>& q,
                        Eigen::Ref<row_matrix<T>> q_latent) {
  const Index dn = s.qk_nope_dim(), dr = s.rope_dim(), dc = s.kv_lora_rank(), dl = s.latent_dim();
  if (w_uk.rows() != s.n_heads() * dn || w_uk.cols() != dc || q.cols() != s.q_width() ||
      q_latent.rows() != q.rows() || q_latent.cols() != s.n_heads() * dl) {
    detail::fail<std::invalid_argument>(
        "mla_absorb_queries: w_uk is ", w_uk.rows(), " x ", w_uk.cols(), ", q ", q.rows(), " x ",
        q.cols(), ", q_latent ", q_latent.rows(), " x ", q_latent.cols(), "; expected ",
        s.n_heads() * dn, " x ", dc, ", n x ", s.q_width(), " and n x ", s.n_heads() * dl);
  }
  for (Index h = 0; h < s.n_heads(); ++h) {
    q_latent.middleCols(h * dl, dc).noalias() =
        q.middleCols(h * (dn + dr), dn) * w_uk.middleRows(h * dn, dn);
    q_latent.middleCols(h * dl + dc, dr) = q.middleCols(h * (dn + dr) + dn, dr);
  }
}

/// The value up-projection of latent outputs: row i of `o_latent` (`n x
/// n_heads*kv_lora_rank`) becomes row i of `out` (`n x n_heads*v_head_dim`), head h
/// W_UV_h o_h. `w_uv` is `n_heads*v_head_dim x kv_lora_rank` (kv_b_proj's value rows). Throws
/// std::invalid_argument when a size does not fit.
template <class T>
void mla_project_values(const mla_shape& s, const Eigen::Ref<const row_matrix<T>>& w_uv,
                        const Eigen::Ref<const row_matrix<T>>& o_latent,
                        Eigen::Ref<row_matrix<T>> out) {
  const Index dc = s.kv_lora_rank(), dv = s.v_head_dim();
  if (w_uv.rows() != s.n_heads() * dv || w_uv.cols() != dc ||
      o_latent.cols() != s.n_heads() * dc || out.rows() != o_latent.rows() ||
      out.cols() != s.out_width()) {
    detail::fail<std::invalid_argument>(
        "mla_project_values: w_uv is ", w_uv.rows(), " x ", w_uv.cols(), ", o_latent ",
        o_latent.rows(), " x ", o_latent.cols(), ", out ", out.rows(), " x ", out.cols(),
        "; expected ", s.n_heads() * dv, " x ", dc, ", n x ", s.n_heads() * dc, " and n x ",
        s.out_width());
  }
  for (Index h = 0; h < s.n_heads(); ++h) {
    out.middleCols(h * dv, dv).noalias() =
        o_latent.middleCols(h * dc, dc) * w_uv.middleRows(h * dv, dv).transpose();
  }
}

/// MLA decode with weight absorption: the attention of one token's queries `q`
/// (`n_heads*(qk_nope_dim + rope_dim)`, RoPE already applied to each q_pe) over the latent rows
/// of `view` (a layer of a cache of shape s.cache(n_layers), any layout and format, or a
/// paged sequence), written to `out` (`n_heads*v_head_dim`, before the output projection).
/// The queries are absorbed into latent space (mla_absorb_queries), attended by the one kernel
/// as multi-query attention whose values are the first kv_lora_rank columns of the keys (each
/// latent row read once, for both), and the latent outputs projected by W_UV
/// (mla_project_values): no per-head key or value is formed. The scale is s.scale() unless
/// `opt.scale` is set; `opt` splits and threads as for decode_attention.
///
/// Cost: reads every cached latent row once; n_heads x (qk_nope_dim + v_head_dim) x
/// kv_lora_rank multiply-adds for the projections. Allocates nothing once `ws` is warm.
/// Throws std::invalid_argument when the weights, q, out or the view do not fit `s` or the
/// view is empty, std::logic_error when `ws` is in use by another call.
template <class View>
void mla_decode_attention(const mla_shape& s,
                          const Eigen::Ref<const row_matrix<detail::view_compute_t<View>>>& w_uk,
                          const Eigen::Ref<const row_matrix<detail::view_compute_t<View>>>& w_uv,
                          const Eigen::Ref<const row_vector<detail::view_compute_t<View>>>& q,
                          const View& view,
                          Eigen::Ref<row_vector<detail::view_compute_t<View>>> out,
                          mla_workspace<detail::view_compute_t<View>>& ws,
                          const attention_options& opt = {}) {
  using T = detail::view_compute_t<View>;
  detail::check_mla_weights<T>("mla_decode_attention", s, w_uk, w_uv);
  detail::check_mla_rows("mla_decode_attention", s, q, out);
  const attention_shape heads = s.attention();
  detail::check_view("mla_decode_attention", heads, view);
  ws.prepare(s, 1);
  auto ql = ws.q_latent.topRows(1);
  auto ol = ws.o_latent.topRows(1);
  // One row as a matrix, in place.
  const Eigen::Map<const row_matrix<T>> q_row(q.data(), 1, q.size());
  Eigen::Map<row_matrix<T>> out_row(out.data(), 1, out.size());
  mla_absorb_queries<T>(s, w_uk, q_row, ql);
  decode_attention(heads, ql.row(0), view, ol.row(0), ws.attention, detail::mla_options(s, opt));
  mla_project_values<T>(s, w_uv, ol, out_row);
}

/// Batched MLA decode over a paged batch (or any batch batch_decode_attention reads): one query
/// row per sequence, q `B x q_width`, out `B x out_width`; as mla_decode_attention for each.
/// Throws as batch_decode_attention and mla_decode_attention do.
template <class Batch>
void mla_batch_decode_attention(
    const mla_shape& s, const Eigen::Ref<const row_matrix<detail::batch_compute_t<Batch>>>& w_uk,
    const Eigen::Ref<const row_matrix<detail::batch_compute_t<Batch>>>& w_uv,
    const Eigen::Ref<const row_matrix<detail::batch_compute_t<Batch>>>& q, const Batch& batch,
    Eigen::Ref<row_matrix<detail::batch_compute_t<Batch>>> out,
    mla_workspace<detail::batch_compute_t<Batch>>& ws, const attention_options& opt = {}) {
  using T = detail::batch_compute_t<Batch>;
  detail::check_mla_weights<T>("mla_batch_decode_attention", s, w_uk, w_uv);
  detail::check_mla_rows("mla_batch_decode_attention", s, q, out);
  if (q.rows() != batch.size()) {
    detail::fail<std::invalid_argument>("mla_batch_decode_attention: q has ", q.rows(),
                                        " rows, expected one per sequence = ", batch.size());
  }
  ws.prepare(s, q.rows());
  auto ql = ws.q_latent.topRows(q.rows());
  auto ol = ws.o_latent.topRows(q.rows());
  mla_absorb_queries<T>(s, w_uk, q, ql);
  batch_decode_attention(s.attention(), ql, batch, ol, ws.attention, detail::mla_options(s, opt));
  mla_project_values<T>(s, w_uv, ol, out);
}

/// MLA prefill of a chunk of `n` tokens onto layer `l` of `cache` (a kv_cache of shape
/// s.cache(n_layers), any layout and format), which may hold tokens already: appends the
/// latent rows `latent` (`n x latent_dim`, each [c_kv | k_pe] with RoPE applied to k_pe) and
/// writes to `out` (`n x n_heads*v_head_dim`) the causal attention of each query row of `q`
/// (`n x q_width`) over what the layer holds for it, as decode steps at those positions would
/// see it: absorbed, as mla_decode_attention, with the chunk cut as prefill_attention cuts it.
/// Checked and reserved before anything is written: throws std::out_of_range for a bad layer,
/// std::invalid_argument for sizes that do not fit, std::length_error past the cache's
/// capacity; the cache is unchanged when it throws.
template <class Layout, class Format, class DerivedL>
void mla_prefill_attention(
    const mla_shape& s, const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& w_uk,
    const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& w_uv,
    const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& q,
    const Eigen::MatrixBase<DerivedL>& latent, kv_cache<Layout, Format>& cache, Index l,
    Eigen::Ref<row_matrix<compute_t<typename Format::scalar_type>>> out,
    mla_workspace<compute_t<typename Format::scalar_type>>& ws, const attention_options& opt = {}) {
  using T = compute_t<typename Format::scalar_type>;
  detail::check_mla_weights<T>("mla_prefill_attention", s, w_uk, w_uv);
  detail::check_mla_rows("mla_prefill_attention", s, q, out);
  ws.prepare(s, q.rows());
  auto ql = ws.q_latent.topRows(q.rows());
  auto ol = ws.o_latent.topRows(q.rows());
  mla_absorb_queries<T>(s, w_uk, q, ql);
  cache.prefill(s.attention(), ql, latent, l, ol, ws.attention, detail::mla_options(s, opt));
  mla_project_values<T>(s, w_uv, ol, out);
}

/// mla_prefill_attention onto layer `l` of sequence `seq` of a paged cache of shape
/// s.cache(n_layers). Throws as paged_kv_cache::prefill does.
template <class Format, class DerivedL>
void mla_prefill_attention(
    const mla_shape& s, const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& w_uk,
    const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& w_uv,
    const Eigen::Ref<const row_matrix<compute_t<typename Format::scalar_type>>>& q,
    const Eigen::MatrixBase<DerivedL>& latent, paged_kv_cache<Format>& cache, Index seq, Index l,
    Eigen::Ref<row_matrix<compute_t<typename Format::scalar_type>>> out,
    mla_workspace<compute_t<typename Format::scalar_type>>& ws, const attention_options& opt = {}) {
  using T = compute_t<typename Format::scalar_type>;
  detail::check_mla_weights<T>("mla_prefill_attention", s, w_uk, w_uv);
  detail::check_mla_rows("mla_prefill_attention", s, q, out);
  ws.prepare(s, q.rows());
  auto ql = ws.q_latent.topRows(q.rows());
  auto ol = ws.o_latent.topRows(q.rows());
  mla_absorb_queries<T>(s, w_uk, q, ql);
  cache.prefill(s.attention(), ql, latent, seq, l, ol, ws.attention, detail::mla_options(s, opt));
  mla_project_values<T>(s, w_uv, ol, out);
}

/// Naive MLA, the oracle, and what uncached decoding uses: for every head, decompress the key
/// [W_UK_h c_t | k_pe_t] and the value W_UV_h c_t of every token t of `latent`
/// (`n_k x latent_dim`), then plain softmax attention of `q` (`n_q x q_width`) in T with the
/// mask and scale of reference_attention (`scale` 0: s.scale()). Returns
/// `n_q x n_heads*v_head_dim`. O(n_k x n_heads x kv_lora_rank x (qk_nope_dim + v_head_dim))
/// for the decompression, O(n_q x n_k) memory per head. Throws std::invalid_argument when a
/// size does not fit, and as reference_attention does.
template <class T, class DerivedUK, class DerivedUV, class DerivedQ, class DerivedL>
row_matrix<T> mla_reference_attention(const mla_shape& s, const Eigen::MatrixBase<DerivedUK>& w_uk,
                                      const Eigen::MatrixBase<DerivedUV>& w_uv,
                                      const Eigen::MatrixBase<DerivedQ>& q,
                                      const Eigen::MatrixBase<DerivedL>& latent,
                                      const attention_mask& mask = {}, double scale = 0.0) {
  const Index dn = s.qk_nope_dim(), dr = s.rope_dim(), dc = s.kv_lora_rank();
  const Index dv = s.v_head_dim(), dq = dn + dr, nk = latent.rows(), nq = q.rows();
  if (w_uk.rows() != s.n_heads() * dn || w_uk.cols() != dc || w_uv.rows() != s.n_heads() * dv ||
      w_uv.cols() != dc || q.cols() != s.q_width() || latent.cols() != s.latent_dim()) {
    detail::fail<std::invalid_argument>(
        "mla_reference_attention: w_uk ", w_uk.rows(), " x ", w_uk.cols(), ", w_uv ", w_uv.rows(),
        " x ", w_uv.cols(), ", q ", nq, " x ", q.cols(), ", latent ", nk, " x ", latent.cols(),
        " do not fit the shape (expected ", s.n_heads() * dn, " x ", dc, ", ", s.n_heads() * dv,
        " x ", dc, ", n_q x ", s.q_width(), ", n_k x ", s.latent_dim(), ")");
  }
  // One head at a time through reference_attention, keys and values zero-padded to a common
  // width: the zero columns change no score (the scale is given) and no output kept.
  const Index w = std::max(dq, dv);
  const attention_shape one(1, 1, w);
  const row_matrix<T> c = latent.leftCols(dc).template cast<T>();
  row_matrix<T> Q = row_matrix<T>::Zero(nq, w), K = row_matrix<T>::Zero(nk, w);
  row_matrix<T> V = row_matrix<T>::Zero(nk, w);
  K.middleCols(dn, dr) = latent.rightCols(dr).template cast<T>();
  row_matrix<T> out(nq, s.out_width());
  const double sc = scale != 0.0 ? scale : s.scale();
  for (Index h = 0; h < s.n_heads(); ++h) {
    Q.leftCols(dq) = q.middleCols(h * dq, dq).template cast<T>();
    K.leftCols(dn).noalias() = c * w_uk.middleRows(h * dn, dn).template cast<T>().transpose();
    V.leftCols(dv).noalias() = c * w_uv.middleRows(h * dv, dv).template cast<T>().transpose();
    out.middleCols(h * dv, dv) = reference_attention<T>(one, Q, K, V, mask, sc).leftCols(dv);
  }
  return out;
}

}  // namespace kvcache
