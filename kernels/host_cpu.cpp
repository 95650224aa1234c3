// Per-step host work of the penalty, for models with many small parameters.
//
// Every step, a bound regularizer re-finds the protected parameters through their modules'
// dicts, checks that they are the ones it was bound to (same Python class, address, dtype,
// shape, contiguity, requires_grad) and the CPU backend reads each gradient's address into its
// segment table. In Python that is five to six attribute reads per parameter, each going
// through the interpreter and a fresh Python object (a torch.Size, an int); after a pass over
// memory these run from cold caches and cost more than the kernel on models of a few million
// parameters. Here the same reads are plain loads from the tensors' C++ objects.
//
// The functions below are the twins of ``fastewc.penalty.binding.ParamLocator.find``
// (locate), of ``fastewc.penalty.binding.fingerprint`` (the record and its comparison) and of
// ``_Segments.set_grads`` in the CPU backend (the gradient column);
// fastewc/penalty/backends/host.py builds this file against the running torch and falls back
// to the Python twins when it cannot.
//
// Nothing here keeps a reference to a tensor beyond the list it returns, and no C++
// exception leaves a function.

#include <Python.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include <torch/csrc/autograd/python_variable.h>

#ifndef TORCH_EXTENSION_NAME
#error "build with -DTORCH_EXTENSION_NAME=<module name>"
#endif
#define FASTEWC_CONCAT2(a, b) a##b
#define FASTEWC_CONCAT(a, b) FASTEWC_CONCAT2(a, b)
#define FASTEWC_STRING2(a) #a
#define FASTEWC_STRING(a) FASTEWC_STRING2(a)

namespace {

// The record of one parameter: its Python class, data address, scalar type, flags
// (bit 0 requires_grad, bit 1 contiguous), number of dimensions, then its sizes.
constexpr int64_t kFixed = 5;

// Whether ``t`` is a tensor whose fields this file may read: defined, strided, with storage.
bool plain(const at::Tensor& t) {
  return t.defined() && t.layout() == c10::kStrided && t.unsafeGetTensorImpl()->has_storage();
}

// Appends the record of ``obj`` to ``out``; false if it is not a plain tensor.
bool append_record(PyObject* obj, std::vector<int64_t>& out) {
  if (!THPVariable_Check(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!plain(t)) return false;
  auto sizes = t.sizes();
  out.push_back(reinterpret_cast<int64_t>(Py_TYPE(obj)));
  out.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  out.push_back(static_cast<int64_t>(t.scalar_type()));
  out.push_back((t.requires_grad() ? 1 : 0) | (t.is_contiguous() ? 2 : 0));
  out.push_back(static_cast<int64_t>(sizes.size()));
  for (int64_t s : sizes) out.push_back(s);
  return true;
}

// Whether ``obj`` still fits the record at ``rec`` (advanced past it when it does).
bool fits(PyObject* obj, const int64_t*& rec, const int64_t* end) {
  if (end - rec < kFixed || Py_TYPE(obj) != reinterpret_cast<PyTypeObject*>(rec[0])) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);  // the class was a tensor class when recorded
  if (!plain(t) || reinterpret_cast<int64_t>(t.data_ptr()) != rec[1] ||
      static_cast<int64_t>(t.scalar_type()) != rec[2])
    return false;
  if (((t.requires_grad() ? 1 : 0) | (t.is_contiguous() ? 2 : 0)) != rec[3]) return false;
  auto sizes = t.sizes();
  int64_t ndim = rec[4];
  if (static_cast<int64_t>(sizes.size()) != ndim || end - rec < kFixed + ndim) return false;
  for (int64_t d = 0; d < ndim; d++)
    if (sizes[d] != rec[kFixed + d]) return false;
  rec += kFixed + ndim;
  return true;
}

bool sequence(PyObject* obj) { return PyList_Check(obj) || PyTuple_Check(obj); }

// record(params: list | tuple) -> bytes | None
PyObject* record(PyObject*, PyObject* params) {
  if (!sequence(params)) {
    PyErr_SetString(PyExc_TypeError, "record() takes a list or tuple of tensors");
    return nullptr;
  }
  try {
    std::vector<int64_t> out;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(params);
    PyObject** items = PySequence_Fast_ITEMS(params);
    out.reserve(static_cast<size_t>(n) * (kFixed + 2));
    for (Py_ssize_t i = 0; i < n; i++)
      if (!append_record(items[i], out)) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                     static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
  } catch (...) {
    Py_RETURN_NONE;  // a tensor this file cannot read: the caller keeps the Python twin
  }
}

// matches(params: list | tuple, record: bytes) -> bool
PyObject* matches(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !sequence(args[0]) || !PyBytes_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "matches() takes a list or tuple of tensors and a record (bytes)");
    return nullptr;
  }
  try {
    PyObject* params = args[0];
    const int64_t* rec = reinterpret_cast<const int64_t*>(PyBytes_AS_STRING(args[1]));
    const int64_t* end = rec + PyBytes_GET_SIZE(args[1]) / static_cast<Py_ssize_t>(sizeof(int64_t));
    Py_ssize_t n = PySequence_Fast_GET_SIZE(params);
    PyObject** items = PySequence_Fast_ITEMS(params);
    for (Py_ssize_t i = 0; i < n; i++)
      if (!fits(items[i], rec, end)) Py_RETURN_FALSE;
    if (rec != end) Py_RETURN_FALSE;
    Py_RETURN_TRUE;
  } catch (...) {
    Py_RETURN_FALSE;
  }
}

// gather_grads(params: list | tuple, grad_column: int, mode_column: int) -> bool
//
// Writes the address of each parameter's ``.grad`` into the int64 array at ``grad_column`` and
// 2 ("add to it") into the int8 array at ``mode_column``, one entry per parameter. False as
// soon as a gradient is missing, not contiguous, not strided or of another dtype than its
// parameter: the columns are then partly written and the caller takes the Python twin.
PyObject* gather_grads(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !sequence(args[0]) || !PyLong_Check(args[1]) || !PyLong_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "gather_grads() takes a list or tuple of tensors and two addresses");
    return nullptr;
  }
  auto* grad_column = static_cast<int64_t*>(PyLong_AsVoidPtr(args[1]));
  auto* mode_column = static_cast<int8_t*>(PyLong_AsVoidPtr(args[2]));
  if (PyErr_Occurred()) return nullptr;
  try {
    PyObject* params = args[0];
    Py_ssize_t n = PySequence_Fast_GET_SIZE(params);
    PyObject** items = PySequence_Fast_ITEMS(params);
    for (Py_ssize_t i = 0; i < n; i++) {
      PyObject* obj = items[i];
      if (!THPVariable_Check(obj)) Py_RETURN_FALSE;
      const at::Tensor& p = THPVariable_Unpack(obj);
      const at::Tensor& g = p.unsafeGetTensorImpl()->grad();
      if (!plain(g) || g.scalar_type() != p.scalar_type() || !g.is_contiguous()) Py_RETURN_FALSE;
      grad_column[i] = reinterpret_cast<int64_t>(g.data_ptr());
      mode_column[i] = 2;
    }
    Py_RETURN_TRUE;
  } catch (...) {
    Py_RETURN_FALSE;
  }
}

// locate(edges: list[tuple[dict, str, object]], slots: list[tuple[dict, str]]) -> list | None
//
// The twin of ``ParamLocator.find``: None if some ``edge[0][edge[1]] is not edge[2]``, else
// ``[slot[0].get(slot[1]) for slot in slots]``. Every dict must be a plain dict (the caller
// checks once): a dict subclass could answer ``get`` differently from the table read here.
PyObject* locate(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "locate() takes a list of edges and a list of slots");
    return nullptr;
  }
  PyObject* edges = args[0];
  PyObject* slots = args[1];
  Py_ssize_t n_edges = PyList_GET_SIZE(edges);
  for (Py_ssize_t i = 0; i < n_edges; i++) {
    PyObject* edge = PyList_GET_ITEM(edges, i);
    if (!PyTuple_Check(edge) || PyTuple_GET_SIZE(edge) != 3 || !PyDict_CheckExact(PyTuple_GET_ITEM(edge, 0))) {
      PyErr_SetString(PyExc_TypeError, "locate(): an edge is not a (dict, name, child) tuple");
      return nullptr;
    }
    PyObject* child = PyDict_GetItemWithError(PyTuple_GET_ITEM(edge, 0), PyTuple_GET_ITEM(edge, 1));
    if (child == nullptr && PyErr_Occurred()) return nullptr;
    if (child != PyTuple_GET_ITEM(edge, 2)) Py_RETURN_NONE;
  }
  Py_ssize_t n = PyList_GET_SIZE(slots);
  PyObject* found = PyList_New(n);
  if (found == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject* slot = PyList_GET_ITEM(slots, i);
    if (!PyTuple_Check(slot) || PyTuple_GET_SIZE(slot) != 2 || !PyDict_CheckExact(PyTuple_GET_ITEM(slot, 0))) {
      Py_DECREF(found);
      PyErr_SetString(PyExc_TypeError, "locate(): a slot is not a (dict, name) tuple");
      return nullptr;
    }
    PyObject* item = PyDict_GetItemWithError(PyTuple_GET_ITEM(slot, 0), PyTuple_GET_ITEM(slot, 1));
    if (item == nullptr) {
      if (PyErr_Occurred()) {
        Py_DECREF(found);
        return nullptr;
      }
      item = Py_None;
    }
    Py_INCREF(item);
    PyList_SET_ITEM(found, i, item);
  }
  return found;
}

PyMethodDef methods[] = {
    {"record", reinterpret_cast<PyCFunction>(record), METH_O,
     "record(params) -> bytes or None: what matches() compares against."},
    {"matches", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(matches)), METH_FASTCALL,
     "matches(params, record) -> bool: every parameter still fits its record."},
    {"locate", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(locate)), METH_FASTCALL,
     "locate(edges, slots) -> list or None: the parameters now under the slots if every edge holds."},
    {"gather_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(gather_grads)), METH_FASTCALL,
     "gather_grads(params, grad_column, mode_column) -> bool: write the gradients' addresses."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, FASTEWC_STRING(TORCH_EXTENSION_NAME),
                      "fastewc's per-step host checks (see host_cpu.cpp)", -1, methods};

}  // namespace

PyMODINIT_FUNC FASTEWC_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
