// megatiny._C — index builders for GPT-style datasets.
//
// Argument order, dtypes and results follow Megatron-Core's megatron/core/datasets/helpers.cpp, so
// an index built by either library can be used by the other. Differences are only in what happens
// on bad input: where Megatron asserts (a no-op in release builds) or reads out of bounds, these
// functions raise ValueError / TypeError with a message. The executable spec of every function is
// the pure-numpy twin in megatiny/data/helpers_ref.py; tests/test_helpers_cpp.py checks equality.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

void require(bool ok, const std::string &message) {
  if (!ok) throw std::invalid_argument(message);
}

// Number of rows (minus one) of the sample index: Megatron's formula, including its float32
// ceil for the keep-last-partial-sequence case (kept bit-for-bit for index compatibility).
int64_t count_samples(int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                      bool drop_last_partial_sequence, int add_extra_token) {
  const int64_t usable = static_cast<int64_t>(num_epochs) * tokens_per_epoch - add_extra_token;
  if (drop_last_partial_sequence) return usable / seq_length;
  return static_cast<int64_t>(
      std::ceil(static_cast<float>(usable) / static_cast<float>(seq_length)));
}

template <typename T>
py::array_t<T> build_sample_idx_typed(const IntArray &sizes_, const IntArray &document_idx_,
                                      int32_t seq_length, int32_t num_epochs,
                                      int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                                      int add_extra_token_to_sequence) {
  require(sizes_.ndim() == 1 && document_idx_.ndim() == 1,
          "build_sample_idx: sizes and document_idx must be 1-D arrays");
  require(seq_length > 1, "build_sample_idx: seq_length must be > 1, got " +
                              std::to_string(seq_length));
  require(num_epochs > 0,
          "build_sample_idx: num_epochs must be > 0, got " + std::to_string(num_epochs));
  require(tokens_per_epoch > 1, "build_sample_idx: tokens_per_epoch must be > 1, got " +
                                    std::to_string(tokens_per_epoch));
  require(add_extra_token_to_sequence == 0 || add_extra_token_to_sequence == 1,
          "build_sample_idx: add_extra_token_to_sequence must be 0 or 1");
  const int64_t num_docs = document_idx_.shape(0);
  const int64_t num_sizes = sizes_.shape(0);
  require(num_docs > 0, "build_sample_idx: document_idx is empty");
  const int32_t *sizes = sizes_.data();
  const int32_t *document_idx = document_idx_.data();

  const int64_t num_samples = count_samples(seq_length, num_epochs, tokens_per_epoch,
                                            drop_last_partial_sequence,
                                            add_extra_token_to_sequence);
  require(num_samples >= 0, "build_sample_idx: not enough tokens for a single sample");
  const int64_t extra = add_extra_token_to_sequence;
  py::array_t<T> result({num_samples + 1, static_cast<int64_t>(2)});
  T *out = result.mutable_data();
  int64_t total_tokens = 0;
  int64_t bad_pos = -1;  // first invalid entry of document_idx, reported once the GIL is back
  bool negative_offset = false;  // kept last sample in an empty last document
  {
    py::gil_scoped_release no_gil;
    // Megatron's loop walks each sample document by document. Its result has a closed form (see
    // helpers_ref.py): row r names the document holding stream token r*seq_length + extra - 1,
    // at offset r*seq_length - (that document's first stream token). One pass over the
    // documents emits the rows in order, touching each document once: about 2x faster than the
    // per-sample walk, with identical output (tests/test_helpers_cpp.py runs the literal loop).
    out[0] = 0;
    out[1] = 0;
    int64_t row = 1;
    int64_t token = seq_length + extra - 1;  // the stream token that decides `row`
    int64_t doc_start = 0;                   // stream position of document_idx[pos]'s first token
    constexpr int64_t kPrefetch = 16;  // sizes[] is read in shuffled order: fetch ahead
    for (int64_t pos = 0; pos < num_docs; ++pos) {
      if (pos + kPrefetch < num_docs) {
        const int32_t ahead = document_idx[pos + kPrefetch];
        if (ahead >= 0 && ahead < num_sizes) __builtin_prefetch(sizes + ahead);
      }
      const int32_t doc = document_idx[pos];
      if (doc < 0 || doc >= num_sizes || sizes[doc] < 0) {
        bad_pos = pos;
        break;
      }
      const int64_t doc_end = doc_start + sizes[doc];
      while (token < doc_end && row <= num_samples) {
        out[2 * row] = static_cast<T>(pos);
        out[2 * row + 1] = static_cast<T>(token + 1 - extra - doc_start);
        ++row;
        token += seq_length;
      }
      doc_start = doc_end;
    }
    total_tokens = doc_start;
    if (bad_pos < 0) {
      // Rows past the data (kept last partial sample): it ends at the last document's end.
      const T last_offset = static_cast<T>(sizes[document_idx[num_docs - 1]] - extra);
      negative_offset = row <= num_samples && last_offset < 0;
      for (; row <= num_samples; ++row) {
        out[2 * row] = static_cast<T>(num_docs - 1);
        out[2 * row + 1] = last_offset;
      }
    }
  }
  if (bad_pos >= 0) {
    const int32_t doc = document_idx[bad_pos];
    if (doc < 0 || doc >= num_sizes) {
      throw std::invalid_argument("build_sample_idx: document_idx[" + std::to_string(bad_pos) +
                                  "] = " + std::to_string(doc) + " is out of range for " +
                                  std::to_string(num_sizes) + " sizes");
    }
    throw std::invalid_argument("build_sample_idx: sizes[" + std::to_string(doc) +
                                "] is negative");
  }
  // Megatron's Python wrapper asserts sample_idx.min() >= 0; say why instead.
  require(!negative_offset,
          "build_sample_idx: the last document of document_idx is empty, so the kept partial "
          "last sample (drop_last_partial_sequence=False with add_extra_token_to_sequence) "
          "would start at offset -1; Megatron's wrapper rejects this too. Drop empty "
          "documents, or keep drop_last_partial_sequence=True");
  const int64_t wanted = static_cast<int64_t>(num_epochs) * tokens_per_epoch;
  require(total_tokens >= wanted,
          "build_sample_idx: document_idx holds " + std::to_string(total_tokens) +
              " tokens but num_epochs * tokens_per_epoch = " + std::to_string(wanted) +
              "; tokens_per_epoch must be the token count of one pass over the split");
  return result;
}

py::array build_sample_idx(const IntArray &sizes, const IntArray &document_idx,
                           int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                           bool drop_last_partial_sequence, int add_extra_token_to_sequence) {
  // Same dtype rule as Megatron's Python wrapper: int32 unless a position or offset could overflow.
  int64_t largest = document_idx.shape(0);
  const int32_t *s = sizes.data();
  for (int64_t i = 0; i < sizes.shape(0); ++i) largest = std::max<int64_t>(largest, s[i]);
  if (largest <= std::numeric_limits<int32_t>::max()) {
    return build_sample_idx_typed<int32_t>(sizes, document_idx, seq_length, num_epochs,
                                           tokens_per_epoch, drop_last_partial_sequence,
                                           add_extra_token_to_sequence);
  }
  return build_sample_idx_typed<int64_t>(sizes, document_idx, seq_length, num_epochs,
                                         tokens_per_epoch, drop_last_partial_sequence,
                                         add_extra_token_to_sequence);
}

void check_outputs(const py::array_t<int16_t> &dataset_index,
                   const py::array_t<int64_t> &dataset_sample_index, int64_t size,
                   const char *name) {
  const std::string fn(name);
  require(dataset_index.ndim() == 1 && dataset_sample_index.ndim() == 1,
          fn + ": dataset_index and dataset_sample_index must be 1-D");
  require(dataset_index.writeable() && dataset_sample_index.writeable(),
          fn + ": output arrays must be writeable");
  require((dataset_index.flags() & py::array::c_style) &&
              (dataset_sample_index.flags() & py::array::c_style),
          fn + ": output arrays must be C-contiguous");
  require(dataset_index.shape(0) >= size && dataset_sample_index.shape(0) >= size,
          fn + ": output arrays hold fewer than size = " + std::to_string(size) + " entries");
}

void build_blending_indices(py::array_t<int16_t> &dataset_index,
                            py::array_t<int64_t> &dataset_sample_index, const F64Array &weights,
                            int32_t num_datasets, int64_t size, bool verbose) {
  require(num_datasets > 0 && num_datasets <= std::numeric_limits<int16_t>::max(),
          "build_blending_indices: num_datasets must be in [1, 32767], got " +
              std::to_string(num_datasets));
  require(size >= 0, "build_blending_indices: size must be >= 0");
  require(weights.ndim() == 1 && weights.shape(0) >= num_datasets,
          "build_blending_indices: weights must be 1-D with num_datasets entries");
  check_outputs(dataset_index, dataset_sample_index, size, "build_blending_indices");
  int16_t *ds_index = dataset_index.mutable_data();
  int64_t *ds_sample = dataset_sample_index.mutable_data();
  const double *w = weights.data();
  std::vector<int64_t> taken(num_datasets, 0);
  {
    py::gil_scoped_release no_gil;
    for (int64_t sample = 0; sample < size; ++sample) {
      // Greedy: give this slot to the dataset that is furthest behind its target share.
      const double n = std::max(static_cast<double>(sample), 1.0);
      int32_t best = 0;
      double best_error = w[0] * n - static_cast<double>(taken[0]);
      for (int32_t d = 1; d < num_datasets; ++d) {
        const double error = w[d] * n - static_cast<double>(taken[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      ds_index[sample] = static_cast<int16_t>(best);
      ds_sample[sample] = taken[best];
      ++taken[best];
    }
  }
  if (verbose) {
    for (int32_t d = 0; d < num_datasets; ++d) {
      const double achieved = size > 0 ? static_cast<double>(taken[d]) / size : 0.0;
      py::print("   dataset", d, "weight:", w[d], "achieved:", achieved);
    }
  }
}

void build_exhaustive_blending_indices(py::array_t<int16_t> &dataset_index,
                                       py::array_t<int64_t> &dataset_sample_index,
                                       const I64Array &sizes, int32_t num_datasets) {
  require(num_datasets > 0 && num_datasets <= std::numeric_limits<int16_t>::max(),
          "build_exhaustive_blending_indices: num_datasets must be in [1, 32767], got " +
              std::to_string(num_datasets));
  require(sizes.ndim() == 1 && sizes.shape(0) >= num_datasets,
          "build_exhaustive_blending_indices: sizes must be 1-D with num_datasets entries");
  const int64_t *n_wanted = sizes.data();
  int64_t total = 0;
  for (int32_t d = 0; d < num_datasets; ++d) {
    require(n_wanted[d] > 0, "build_exhaustive_blending_indices: sizes[" + std::to_string(d) +
                                 "] must be > 0, got " + std::to_string(n_wanted[d]));
    total += n_wanted[d];
  }
  check_outputs(dataset_index, dataset_sample_index, total, "build_exhaustive_blending_indices");
  int16_t *ds_index = dataset_index.mutable_data();
  int64_t *ds_sample = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release no_gil;
    std::vector<double> weights(num_datasets);
    for (int32_t d = 0; d < num_datasets; ++d) {
      weights[d] = n_wanted[d] / static_cast<double>(total);
    }
    std::vector<int64_t> taken(num_datasets, 0);
    std::vector<char> spent(num_datasets, 0);
    for (int64_t sample = 0; sample < total; ++sample) {
      // As above, but a dataset leaves the race once it has given exactly sizes[d] samples.
      const double n = std::max(static_cast<double>(sample), 1.0);
      int32_t best = -1;
      double best_error = std::numeric_limits<double>::lowest();
      for (int32_t d = 0; d < num_datasets; ++d) {
        if (spent[d]) continue;
        const double error = weights[d] * n - static_cast<double>(taken[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      ds_index[sample] = static_cast<int16_t>(best);
      ds_sample[sample] = taken[best];
      ++taken[best];
      if (taken[best] == n_wanted[best]) spent[best] = 1;
    }
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "megatiny C++ index helpers (Megatron-Core compatible); spec: megatiny.data.helpers_ref";

  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("document_idx"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence") = true, py::arg("add_extra_token_to_sequence") = 1,
        R"doc(Build the GPT sample index: a [num_samples + 1, 2] int32 (int64 when positions or
document sizes exceed int32) array.

The documents listed by `document_idx` (ids into `sizes`, all epochs concatenated, already
shuffled) are laid end to end as one token stream. Row i = (p, o) says that sample i starts at
token offset o of document document_idx[p]; sample i ends where row i + 1 starts, plus
`add_extra_token_to_sequence` (0/1) tokens. With the extra token a sample holds seq_length + 1
tokens (inputs and the shifted labels) and consecutive samples share one boundary token, so sample
i covers stream tokens [i*seq_length, (i+1)*seq_length + extra). A sample crosses document and
epoch boundaries freely (epochs are just more documents in `document_idx`). Empty documents are
skipped. num_samples = (num_epochs*tokens_per_epoch - extra) // seq_length; with
drop_last_partial_sequence=False it is the float32 ceil of that ratio and the final, partial
sample ends at the last document's end (its row is (len(document_idx)-1, size - extra)).)doc");
  m.def("build_sample_idx_int32", &build_sample_idx_typed<int32_t>, py::arg("sizes"),
        py::arg("document_idx"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = 1, "build_sample_idx with int32 output.");
  m.def("build_sample_idx_int64", &build_sample_idx_typed<int64_t>, py::arg("sizes"),
        py::arg("document_idx"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = 1, "build_sample_idx with int64 output.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index").noconvert(),
        py::arg("dataset_sample_index").noconvert(), py::arg("weights"), py::arg("num_datasets"),
        py::arg("size"), py::arg("verbose") = false,
        R"doc(Fill dataset_index (int16) and dataset_sample_index (int64), in place, for `size` blended
samples. Slot s goes to the dataset d maximising weights[d] * max(s, 1) - taken[d] (lowest d on
ties), i.e. the one furthest behind its share so far; dataset_sample_index[s] = taken[d] is that
dataset's running sample count. Weights should be normalised to sum to 1.)doc");
  m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices,
        py::arg("dataset_index").noconvert(), py::arg("dataset_sample_index").noconvert(),
        py::arg("sizes"), py::arg("num_datasets"),
        R"doc(Like build_blending_indices with weights = sizes / sum(sizes), but draws exactly sizes[d]
samples from dataset d (sum(sizes) slots in all); a dataset that has given all its samples drops
out of the argmax.)doc");
}
