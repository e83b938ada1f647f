// pybind11 bindings of the native search core: fine_infer._native, imported only by fine_infer.index._native_search.
// Arguments are checked again here (the Python layer gives the friendly errors); the GIL is released while searching.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "kernels.hpp"  // kPanel: the storage layout
#include "search.hpp"

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style>;
using i64 = py::array_t<int64_t, py::array::c_style>;

namespace {

fine_infer::Dtype gallery_dtype(const py::array& panels) {
  const py::dtype dt = panels.dtype();
  if (dt.kind() == 'f' && dt.itemsize() == 4) return fine_infer::Dtype::f32;
  if (dt.kind() == 'f' && dt.itemsize() == 2) return fine_infer::Dtype::f16;
  if (dt.kind() == 'i' && dt.itemsize() == 1) return fine_infer::Dtype::i8;
  throw std::invalid_argument("gallery panels must be float32, float16 or int8");
}

void check_queries(const f32& queries, const char* what) {
  if (queries.ndim() != 2) throw std::invalid_argument(std::string(what) + " must be 2-D (nq, dim)");
}

py::tuple search(f32 queries, py::array panels, int64_t n, int64_t k, std::optional<f32> scales, int threads) {
  check_queries(queries, "queries");
  if (!(panels.flags() & py::array::c_style)) throw std::invalid_argument("gallery panels must be C-contiguous");
  if (panels.ndim() != 3 || panels.shape(2) != fine_infer::kPanel)
    throw std::invalid_argument("gallery panels must have shape (npanels, dim, 16)");
  const int64_t nq = queries.shape(0), dim = queries.shape(1);
  if (panels.shape(1) != dim) throw std::invalid_argument("queries and gallery have different dims");
  if (n < 0 || n > panels.shape(0) * fine_infer::kPanel) throw std::invalid_argument("n exceeds the gallery panels");
  if (k < 0) throw std::invalid_argument("k must be >= 0");
  fine_infer::Gallery g;
  g.panels = panels.data();
  g.dtype = gallery_dtype(panels);
  g.n = n;
  g.dim = dim;
  if (g.dtype == fine_infer::Dtype::i8) {
    if (!scales || scales->ndim() != 1 || scales->shape(0) != dim)
      throw std::invalid_argument("an int8 gallery needs float32 scales of shape (dim,)");
    g.scales = scales->data();
  }
  py::array_t<float> out_s({nq, k});
  py::array_t<int64_t> out_i({nq, k});
  {
    py::gil_scoped_release release;
    fine_infer::search(queries.data(), nq, g, k, out_s.mutable_data(), out_i.mutable_data(), threads);
  }
  return py::make_tuple(out_s, out_i);
}

py::tuple rescore(f32 queries, f32 rows, i64 candidates, int64_t k, int threads) {
  check_queries(queries, "queries");
  if (rows.ndim() != 2 || rows.shape(1) != queries.shape(1))
    throw std::invalid_argument("rows must be 2-D (n, dim) with the queries' dim");
  if (candidates.ndim() != 2 || candidates.shape(0) != queries.shape(0))
    throw std::invalid_argument("candidates must be 2-D (nq, kc)");
  if (k < 0) throw std::invalid_argument("k must be >= 0");
  const int64_t nq = queries.shape(0);
  py::array_t<float> out_s({nq, k});
  py::array_t<int64_t> out_i({nq, k});
  {
    py::gil_scoped_release release;
    fine_infer::rescore(queries.data(), nq, queries.shape(1), rows.data(), rows.shape(0), candidates.data(),
                        candidates.shape(1), k, out_s.mutable_data(), out_i.mutable_data(), threads);
  }
  return py::make_tuple(out_s, out_i);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "fine-infer native search core (private: use fine_infer.Index)";
  m.attr("PANEL") = fine_infer::kPanel;
  m.def("search", &search, py::arg("queries").noconvert(), py::arg("panels"), py::arg("n"), py::arg("k"),
        py::arg("scales").noconvert() = py::none(), py::arg("threads") = 0,
        "Exact top-k inner products over a panel-layout gallery: (scores float32 (nq,k), slots int64 (nq,k)), "
        "-inf / -1 past the gallery. The GIL is released while it runs.");
  m.def("rescore", &rescore, py::arg("queries").noconvert(), py::arg("rows").noconvert(),
        py::arg("candidates").noconvert(), py::arg("k"), py::arg("threads") = 0,
        "Exact fp32 scores of candidate slots (rows of a row-major float32 array), best k first.");
  m.def("active_isa", &fine_infer::active_isa, "The instruction set the kernels run with.");
  m.def("available_isas", &fine_infer::available_isas, "Instruction sets this build and CPU can run, best first.");
  m.def("set_isa", &fine_infer::set_isa, py::arg("name"), "Force an instruction set; False if unavailable here.");
}
