// pybind11 bindings of the native search core: fine_infer._native (imported only by fine_infer.index).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <thread>

#include "topk.hpp"

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

static py::tuple topk(f32 queries, f32 gallery, int64_t k, int threads) {
  if (queries.ndim() != 2 || gallery.ndim() != 2) throw std::invalid_argument("queries and gallery must be 2-D");
  if (queries.shape(1) != gallery.shape(1)) throw std::invalid_argument("queries and gallery dims differ");
  if (k < 1) throw std::invalid_argument("k must be >= 1");
  const int64_t nq = queries.shape(0), n = gallery.shape(0), d = queries.shape(1);
  py::array_t<float> scores({nq, k});
  py::array_t<int64_t> indices({nq, k});
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  {
    py::gil_scoped_release release;
    fine_infer::topk_inner_product(queries.data(), nq, gallery.data(), n, d, k, scores.mutable_data(),
                                   indices.mutable_data(), threads);
  }
  return py::make_tuple(scores, indices);
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "fine-infer native search core";
  m.def("topk_inner_product", &topk, py::arg("queries"), py::arg("gallery"), py::arg("k"), py::arg("threads") = 0,
        "Exact top-k by inner product: (scores float32 (nq,k), indices int64 (nq,k)); -inf/-1 past the gallery.");
}
