// SPDX-License-Identifier: Apache-2.0
// Continuous batching over a paged KV cache: requests admitted as batch slots and pages allow,
// their prompts prefilled in chunks beside the decode tokens of the running ones, prompt pages
// shared through the prefix cache, and the newest request preempted when the pages run out.
#pragma once

#include "batched.hpp"
#include "tiny_decoder/generate.hpp"

#include <kvcache/store/tiered.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <stdexcept>
#include <string>
#include <vector>

namespace serve {

/// One request: its prompt, then the tokens generated for it.
struct request {
  std::vector<std::int32_t> tokens;  // the prompt, then each generated token
  Index prompt_len = 0;
  Index gen = 0;                     // tokens to generate
  // Scheduling state.
  Index seq = -1;                    // its sequence in the cache while running, else -1
  Index computed = 0;                // tokens whose keys and values the sequence holds
  double first_token_ms = -1;        // since the start of the serving loop
  double done_ms = -1;
  Index preempted = 0;               // times it was preempted

  Index generated() const { return Index(tokens.size()) - prompt_len; }
  bool done() const { return generated() >= gen; }
};

struct scheduler_options {
  Index max_batch = 16;           // requests running at once
  Index chunk = 256;              // prompt tokens prefilled a step, over all requests
  bool publish = true;            // publish prompt pages to the prefix cache
  std::string extra_key;          // the prefix cache's key: the model
  // Tiers beyond the pool (disk, Redis) over the same cache, or null: prompts' pages missing
  // from the pool are restored from them, published pages written to them.
  kvcache::tiered_prefix_cache<kvcache::plain_format<float>>* tiers = nullptr;
};

/// What a serving run did.
struct serve_stats {
  Index steps = 0;
  Index preemptions = 0;
  Index admissions = 0;
  Index prefill_tokens = 0;      // tokens prefilled at admissions: prompts (and, after a
                                 // preemption, the tokens generated before it)
  Index prefix_hit_tokens = 0;   // of them, adopted from the prefix cache
  Index prefix_waits = 0;        // steps the next request waited for a running one's prompt
                                 // pages to be published
  Index computed_tokens = 0;     // rows run through the model
  Index decode_rows = 0;         // of them, decode tokens
  Index peak_kv_bytes = 0;       // the cache's largest bytes()
  Index peak_pages = 0;          // its most pages in use
  Index max_rows = 0;            // most rows in one step
  Index max_running = 0;         // most requests running at once
  double wall_ms = 0;            // the serving loop, start to end
  double forward_ms = 0;         // of it, in the forward pass
};

/// Serves requests on `model` and `cache` by continuous batching. Each step:
///  1. every running request takes its rows: one token when decoding; when prefilling (its
///     prompt, or after a preemption its prompt and generated tokens), the next chunk of what
///     its sequence does not hold yet, within a budget of `chunk` prefill tokens a step;
///  2. waiting requests are admitted, oldest first, while fewer than `max_batch` run, prefill
///     budget is left and the pool has the pages the step needs: each gets
///     create(tokens, n, extra_key), adopting the cached pages of its prompt's start (restored
///     from the tiers first when the pool misses them and `tiers` is given), and
///     prefills only the rest. A request whose prompt shares more full pages with the prompt
///     a running request is still prefilling than the cache holds waits until they are
///     published, rather than computing them a second time;
///  3. one forward pass runs all rows; every request whose rows reach its last token samples
///     the next token (greedy); prompt pages are published as they fill; a request that has
///     all its tokens frees its sequence, and its slot goes to the next waiting one.
/// When the pool is short of the pages the step's appends take (std::length_error from the
/// forward pass, which checks them before changing anything, as append does), the most
/// recently admitted request is preempted: its sequence freed, the request put back at the
/// front of the queue to be recomputed from its prompt and the tokens it generated, and the
/// step planned again without admitting anyone.
class scheduler {
 public:
  scheduler(batched_decoder& model, paged_cache& cache, scheduler_options opt)
      : model_(model), cache_(cache), opt_(std::move(opt)) {
    // A step has a decode row for each running request and at most `budget_` prefill rows.
    budget_ = std::min(opt_.chunk, model.max_rows() - opt_.max_batch);
    if (opt_.max_batch < 1 || opt_.max_batch > model.max_seqs() || budget_ < 1) {
      throw std::invalid_argument("scheduler: max_batch = " + std::to_string(opt_.max_batch) +
                                  " and chunk = " + std::to_string(opt_.chunk) + " must be >= 1 "
                                  "and fit the model's " + std::to_string(model.max_seqs()) +
                                  " sequences and " + std::to_string(model.max_rows()) +
                                  " rows a step");
    }
    step_.reserve(opt_.max_batch, model.max_rows());
    entries_.reserve(std::size_t(opt_.max_batch));
    running_.reserve(std::size_t(opt_.max_batch));
    logit_row_.resize(model.cfg().vocab_size);
  }

  /// Serves every request of `reqs`, which must not be running, until each has its tokens.
  serve_stats run(std::vector<request>& reqs) {
    using clock = std::chrono::steady_clock;
    const auto since = [](clock::time_point t0) {
      return std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    };
    serve_stats st;
    std::deque<Index> waiting;
    for (std::size_t i = 0; i < reqs.size(); ++i) {
      request& r = reqs[i];
      if (r.prompt_len < 1 || r.gen < 1 || Index(r.tokens.size()) != r.prompt_len) {
        throw std::invalid_argument("scheduler: request " + std::to_string(i) +
                                    " needs a prompt, no generated tokens and gen >= 1");
      }
      r.tokens.reserve(std::size_t(r.prompt_len + r.gen));
      r.seq = -1;
      r.computed = 0;
      r.first_token_ms = r.done_ms = -1;
      r.preempted = 0;
      waiting.push_back(Index(i));
    }
    running_.clear();
    tiny::sampler greedy;
    const auto t0 = clock::now();
    bool admit = true;
    while (!waiting.empty() || !running_.empty()) {
      plan(reqs, waiting, admit, st);
      if (step_.size() == 0) {
        throw std::logic_error("scheduler: no request can run (" + std::to_string(waiting.size()) +
                               " waiting, " + std::to_string(running_.size()) + " running)");
      }
      const auto f0 = clock::now();
      try {
        model_.forward(cache_, step_);
      } catch (const std::length_error&) {
        st.forward_ms += since(f0);
        preempt_newest(reqs, waiting, st);
        admit = false;  // plan again with the requests left running
        continue;
      }
      st.forward_ms += since(f0);
      admit = true;
      ++st.steps;
      st.computed_tokens += step_.rows();
      st.max_rows = std::max(st.max_rows, step_.rows());
      st.max_running = std::max(st.max_running, Index(running_.size()));
      st.peak_kv_bytes = std::max(st.peak_kv_bytes, cache_.bytes());
      st.peak_pages = std::max(st.peak_pages, cache_.stats().used);
      Index wanted = 0;
      for (const entry& e : entries_) {
        request& r = reqs[std::size_t(e.req)];
        const Index before = r.computed;
        r.computed += e.rows;
        if (opt_.publish && before < r.prompt_len) {
          const Index n = std::min(r.computed, r.prompt_len);
          if (opt_.tiers != nullptr) {
            opt_.tiers->publish(r.seq, r.tokens.data(), n, opt_.extra_key);
          } else {
            cache_.publish(r.seq, r.tokens.data(), n, opt_.extra_key);
          }
        }
        if (r.computed != Index(r.tokens.size())) continue;
        logit_row_ = model_.logits().row(wanted++).transpose();
        r.tokens.push_back(std::int32_t(greedy(logit_row_)));
        if (r.first_token_ms < 0) r.first_token_ms = since(t0);
        if (r.done()) {
          r.done_ms = since(t0);
          cache_.free(r.seq);
          r.seq = -1;
          running_.erase(std::find(running_.begin(), running_.end(), e.req));
        }
      }
    }
    st.wall_ms = since(t0);
    return st;
  }

 private:
  struct entry {
    Index req;
    Index rows;
  };

  // Fills step_ and entries_: the running requests' rows, then admissions.
  void plan(std::vector<request>& reqs, std::deque<Index>& waiting, bool admit, serve_stats& st) {
    step_.clear();
    entries_.clear();
    Index budget = budget_;
    Index pages = 0;  // pages the step needs
    for (const Index i : running_) {
      request& r = reqs[std::size_t(i)];
      const Index left = Index(r.tokens.size()) - r.computed;
      const bool decode = left == 1 && r.generated() > 0;
      const Index n = decode ? 1 : std::min(left, budget);
      if (n == 0) continue;
      if (!decode) budget -= n;
      add(r, i, n);
      pages += cache_.pages_needed(r.seq, n);
    }
    if (!admit) return;
    while (!waiting.empty() && Index(running_.size()) < opt_.max_batch && budget > 0) {
      const Index i = waiting.front();
      request& r = reqs[std::size_t(i)];
      const Index total = Index(r.tokens.size());
      if (opt_.publish &&
          awaits_prefix(reqs, r, cache_.match_prefix(r.tokens.data(), total - 1, opt_.extra_key))) {
        ++st.prefix_waits;
        break;
      }
      const Index seq = opt_.tiers != nullptr
                            ? opt_.tiers->create(r.tokens.data(), total, opt_.extra_key)
                            : cache_.create(r.tokens.data(), total, opt_.extra_key);
      const Index hit = cache_.prefix_hit(seq);
      const Index n = std::min(total - hit, budget);
      const Index need = pages + cache_.pages_needed(seq, n);
      const kvcache::pool_stats ps = cache_.stats();
      if (need > ps.free + ps.cached) {
        cache_.free(seq);
        break;
      }
      waiting.pop_front();
      running_.push_back(i);
      r.seq = seq;
      r.computed = hit;
      ++st.admissions;
      st.prefill_tokens += total;
      st.prefix_hit_tokens += hit;
      pages = need;
      budget -= n;
      add(r, i, n);
    }
  }

  // Whether a running request is still prefilling a prompt that shares more full pages with
  // r's tokens than the cache holds for them (`cached` tokens): it publishes them as they
  // fill, and admitting r now would compute them a second time.
  bool awaits_prefix(const std::vector<request>& reqs, const request& r, Index cached) const {
    const Index P = cache_.page_size();
    const Index limit = Index(r.tokens.size()) - 1;  // create adopts all but the last token
    for (const Index i : running_) {
      const request& o = reqs[std::size_t(i)];
      if (o.computed >= o.prompt_len) continue;  // every page of its prompt is published
      const Index n = std::min(limit, o.prompt_len);
      const auto end = r.tokens.begin() + n;
      const Index common = Index(std::mismatch(r.tokens.begin(), end, o.tokens.begin()).first -
                                 r.tokens.begin());
      if (common / P * P > cached) return true;
    }
    return false;
  }

  void add(const request& r, Index i, Index n) {
    const bool last = r.computed + n == Index(r.tokens.size());
    step_.add(r.seq, r.computed, r.tokens.data() + r.computed, n, last);
    entries_.push_back({i, n});
  }

  void preempt_newest(std::vector<request>& reqs, std::deque<Index>& waiting, serve_stats& st) {
    if (running_.size() <= 1) {
      throw std::runtime_error("scheduler: the pool's " + std::to_string(cache_.stats().total) +
                               " pages cannot hold one request");
    }
    const Index i = running_.back();
    running_.pop_back();
    request& r = reqs[std::size_t(i)];
    cache_.free(r.seq);
    r.seq = -1;
    r.computed = 0;
    ++r.preempted;
    ++st.preemptions;
    waiting.push_front(i);
  }

  batched_decoder& model_;
  paged_cache& cache_;
  scheduler_options opt_;
  Index budget_ = 0;
  step step_;
  std::vector<entry> entries_;
  std::vector<Index> running_;  // admission order, oldest first
  tiny::vector logit_row_;
};

}  // namespace serve
