// fastckpt._native: positional file I/O and codec kernels on buffer-protocol objects
// with the GIL released. Plain CPython C API so the module builds without PyTorch
// headers and works on any exporter (bytearray, numpy arrays, tensor.numpy() views,
// mmap). fastckpt/fileio.py mirrors every I/O function here in pure Python, and
// fastckpt/codec.py the byte grouping; keep them in sync.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <system_error>
#include <thread>
#include <vector>

#include "codec.h"

namespace {

// Chunks smaller than this are not worth a thread: spawning one costs tens of
// microseconds, which a 4 MiB page-cache copy already amortises.
constexpr size_t kMinChunk = size_t{4} << 20;
constexpr int kMaxThreads = 64;
// 4096 satisfies O_DIRECT on every common device (logical blocks are 512 or 4096).
constexpr size_t kAlign = 4096;
constexpr size_t kBounce = size_t{16} << 20;
// Stored in Status::err to mean "the file ended early" rather than an errno.
constexpr int kEof = -1;

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Releases the GIL for its scope; the I/O below never touches Python objects.
struct NoGil {
  PyThreadState* state = PyEval_SaveThread();
  ~NoGil() { PyEval_RestoreThread(state); }
};

// Holds a Py_buffer and releases it on every exit path.
struct Buffer {
  Py_buffer view{};
  bool held = false;
  ~Buffer() {
    if (held) PyBuffer_Release(&view);
  }
  char* data() const { return static_cast<char*>(view.buf); }
  size_t size() const { return static_cast<size_t>(view.len); }
};

// Same request as memoryview(obj), so both implementations fail alike.
bool get_buffer(PyObject* obj, Buffer& b, bool writable) {
  if (PyObject_GetBuffer(obj, &b.view, PyBUF_FULL_RO) < 0) return false;
  b.held = true;
  if (!PyBuffer_IsContiguous(&b.view, 'C')) {
    PyErr_SetString(PyExc_TypeError, "buffer must be C-contiguous");
    return false;
  }
  if (writable && b.view.readonly) {
    PyErr_SetString(PyExc_TypeError, "buffer must be writable");
    return false;
  }
  return true;
}

bool check_range(long long offset, size_t len) {
  if (offset < 0) {
    PyErr_Format(PyExc_ValueError, "offset must be >= 0, got %lld", offset);
    return false;
  }
  if (len > static_cast<unsigned long long>(LLONG_MAX - offset)) {
    PyErr_SetString(PyExc_OverflowError, "offset + buffer length overflows a file offset");
    return false;
  }
  return true;
}

bool check_threads(int threads) {
  if (threads >= 1) return true;
  PyErr_Format(PyExc_ValueError, "threads must be >= 1, got %d", threads);
  return false;
}

// fstat with the GIL released; sets OSError on failure.
bool file_size(int fd, long long* size, bool* regular) {
  struct stat st;
  int rc, err;
  {
    NoGil nogil;
    rc = fstat(fd, &st);
    err = errno;
  }
  if (rc < 0) {
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    return false;
  }
  *size = static_cast<long long>(st.st_size);
  *regular = S_ISREG(st.st_mode);
  return true;
}

void set_eof_error(const char* fn, long long offset, size_t len, long long size) {
  PyErr_Format(PyExc_EOFError, "%s wants bytes [%lld, %lld) but the file has %lld bytes", fn,
               offset, offset + static_cast<long long>(len), size);
}

// Refuses a read past the end before any memory is touched. Only regular files
// report a meaningful st_size; other kinds are caught by the read itself.
bool check_eof(const char* fn, int fd, long long offset, size_t len) {
  long long size;
  bool regular;
  if (!file_size(fd, &size, &regular)) return false;
  if (len && regular && offset + static_cast<long long>(len) > size) {
    set_eof_error(fn, offset, len, size);
    return false;
  }
  return true;
}

// The first failure of any worker; the others stop at their next syscall.
struct Status {
  std::atomic<int> err{0};
  void fail(int e) {
    int none = 0;
    err.compare_exchange_strong(none, e);
  }
  bool failed() const { return err.load(std::memory_order_relaxed) != 0; }
};

void read_range(int fd, char* dst, size_t len, long long off, Status& st) {
  while (len && !st.failed()) {
    ssize_t r = pread(fd, dst, len, off);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return st.fail(r < 0 ? errno : kEof);
    dst += r;
    len -= static_cast<size_t>(r);
    off += r;
  }
}

void write_range(int fd, const char* src, size_t len, long long off, Status& st) {
  while (len && !st.failed()) {
    ssize_t r = pwrite(fd, src, len, off);
    if (r < 0 && errno == EINTR) continue;
    // A zero-byte write would loop forever; the kernel only does it on a dead device.
    if (r <= 0) return st.fail(r < 0 ? errno : EIO);
    src += r;
    len -= static_cast<size_t>(r);
    off += r;
  }
}

// Runs fn(start, end) over page-aligned slices of [0, len), one per thread; the
// caller's thread takes the first slice. Joins every worker before returning so
// no thread touches the buffer after the Python call ends.
void parallel_chunks(size_t len, int threads, const std::function<void(size_t, size_t)>& fn) {
  size_t n = std::min<size_t>({static_cast<size_t>(threads), static_cast<size_t>(kMaxThreads),
                               std::max<size_t>(1, len / kMinChunk)});
  size_t per = round_up((len + n - 1) / n, kAlign);
  std::vector<std::thread> workers;
  workers.reserve(n);
  for (size_t start = per; start < len; start += per) {
    size_t end = std::min(len, start + per);
    try {
      workers.emplace_back([&fn, start, end] { fn(start, end); });
    } catch (const std::system_error&) {
      fn(start, end);  // out of threads: do the slice here instead
    }
  }
  fn(0, std::min(len, per));
  for (auto& t : workers) t.join();
}

// Turns a Status into the Python exception it stands for; false if one was set.
bool raise_status(const Status& st, const char* fn, int fd, long long offset, size_t len) {
  int e = st.err.load();
  if (e == 0) return true;
  if (e == kEof) {
    long long size = -1;
    bool regular;
    if (file_size(fd, &size, &regular)) set_eof_error(fn, offset, len, size);
    return false;
  }
  errno = e;
  PyErr_SetFromErrno(PyExc_OSError);
  return false;
}

PyObject* py_pread_into(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"fd", "offset", "buf", "threads", nullptr};
  int fd, threads = 1;
  long long offset;
  PyObject* obj;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLO|i", const_cast<char**>(kw), &fd, &offset,
                                   &obj, &threads))
    return nullptr;
  Buffer b;
  if (!get_buffer(obj, b, true) || !check_range(offset, b.size()) || !check_threads(threads) ||
      !check_eof("pread_into", fd, offset, b.size()))
    return nullptr;
  Status st;
  char* base = b.data();
  {
    NoGil nogil;
    parallel_chunks(b.size(), threads, [&](size_t s, size_t e) {
      read_range(fd, base + s, e - s, offset + static_cast<long long>(s), st);
    });
  }
  if (!raise_status(st, "pread_into", fd, offset, b.size())) return nullptr;
  Py_RETURN_NONE;
}

PyObject* py_pwrite_all(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"fd", "offset", "buf", "threads", nullptr};
  int fd, threads = 1;
  long long offset;
  PyObject* obj;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLO|i", const_cast<char**>(kw), &fd, &offset,
                                   &obj, &threads))
    return nullptr;
  Buffer b;
  if (!get_buffer(obj, b, false) || !check_range(offset, b.size()) || !check_threads(threads))
    return nullptr;
  Status st;
  const char* base = b.data();
  {
    NoGil nogil;
    parallel_chunks(b.size(), threads, [&](size_t s, size_t e) {
      write_range(fd, base + s, e - s, offset + static_cast<long long>(s), st);
    });
  }
  if (!raise_status(st, "pwrite_all", fd, offset, b.size())) return nullptr;
  Py_RETURN_NONE;
}

// Reads one byte in every page of [p, p + len). volatile keeps the loads: their
// only purpose is the page fault they trigger.
void touch_pages(const char* p, size_t len, size_t page) {
  const volatile char* v = p;
  char sink = v[0];
  size_t first = round_up(reinterpret_cast<uintptr_t>(p), page) - reinterpret_cast<uintptr_t>(p);
  for (size_t i = first; i < len; i += page) sink ^= v[i];
  static_cast<void>(sink);
}

PyObject* py_prefault(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"buf", "threads", nullptr};
  int threads = 2;
  PyObject* obj;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|i", const_cast<char**>(kw), &obj, &threads))
    return nullptr;
  Buffer b;
  if (!get_buffer(obj, b, false) || !check_threads(threads)) return nullptr;
  if (b.size() == 0) Py_RETURN_NONE;
  const char* base = b.data();
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  {
    NoGil nogil;
    parallel_chunks(b.size(), threads,
                    [&](size_t s, size_t e) { touch_pages(base + s, e - s, page); });
  }
  Py_RETURN_NONE;
}

struct FreeDeleter {
  void operator()(char* p) const { std::free(p); }
};
using AlignedPtr = std::unique_ptr<char, FreeDeleter>;

AlignedPtr aligned_alloc_or_null(size_t size) {
  void* p = nullptr;
  return AlignedPtr(posix_memalign(&p, kAlign, size) == 0 ? static_cast<char*>(p) : nullptr);
}

bool is_aligned(uintptr_t v) { return v % kAlign == 0; }

// O_DIRECT wants aligned offsets, lengths and addresses, so every read goes
// through whole aligned blocks in a bounce buffer; only the part the caller
// asked for is copied out. A short block that ends mid-page is the file's end.
void direct_read(int fd, char* dst, size_t len, long long offset, Status& st) {
  size_t head = static_cast<size_t>(offset) % kAlign;
  size_t cap = std::min(kBounce, round_up(head + len, kAlign));
  AlignedPtr bounce = aligned_alloc_or_null(cap);
  if (!bounce) return st.fail(ENOMEM);
  for (size_t done = 0; done < len && !st.failed();) {
    long long pos = offset + static_cast<long long>(done);
    long long block = pos - pos % static_cast<long long>(kAlign);
    size_t skip = static_cast<size_t>(pos - block);
    size_t want = std::min(cap, round_up(skip + len - done, kAlign));
    size_t got = 0;
    while (got < want) {
      ssize_t r = pread(fd, bounce.get() + got, want - got, block + static_cast<long long>(got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return st.fail(errno);
      got += static_cast<size_t>(r);
      if (r == 0 || !is_aligned(got)) break;
    }
    if (got <= skip) return st.fail(kEof);
    size_t n = std::min(got - skip, len - done);
    std::memcpy(dst + done, bounce.get() + skip, n);
    done += n;
  }
}

PyObject* py_pread_direct_into(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"fd", "offset", "buf", nullptr};
  int fd;
  long long offset;
  PyObject* obj;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLO", const_cast<char**>(kw), &fd, &offset,
                                   &obj))
    return nullptr;
  Buffer b;
  if (!get_buffer(obj, b, true) || !check_range(offset, b.size()) ||
      !check_eof("pread_direct_into", fd, offset, b.size()))
    return nullptr;
  if (b.size() == 0) Py_RETURN_NONE;
  Status st;
  char* dst = b.data();
  size_t len = b.size();
  bool zero_copy = is_aligned(static_cast<uintptr_t>(offset)) && is_aligned(len) &&
                   is_aligned(reinterpret_cast<uintptr_t>(dst));
  {
    NoGil nogil;
    if (zero_copy)
      read_range(fd, dst, len, offset, st);
    else
      direct_read(fd, dst, len, offset, st);
  }
  if (!raise_status(st, "pread_direct_into", fd, offset, len)) return nullptr;
  Py_RETURN_NONE;
}

// Writes the aligned body of src with O_DIRECT, staging it through an aligned
// bounce buffer when src itself is not aligned.
void direct_write_body(int fd, const char* src, size_t len, long long offset, Status& st) {
  if (len == 0) return;
  if (is_aligned(reinterpret_cast<uintptr_t>(src))) return write_range(fd, src, len, offset, st);
  AlignedPtr bounce = aligned_alloc_or_null(std::min(kBounce, len));
  if (!bounce) return st.fail(ENOMEM);
  for (size_t done = 0; done < len && !st.failed();) {
    size_t n = std::min(kBounce, len - done);
    std::memcpy(bounce.get(), src + done, n);
    write_range(fd, bounce.get(), n, offset + static_cast<long long>(done), st);
    done += n;
  }
}

// A tail shorter than a block cannot go through O_DIRECT, so it is written
// through a second, buffered descriptor for the same file.
void buffered_write(int fd, const char* src, size_t len, long long offset, Status& st) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  int twin = open(path, O_WRONLY | O_CLOEXEC);
  if (twin < 0) return st.fail(errno);
  write_range(twin, src, len, offset, st);
  close(twin);
}

PyObject* py_pwrite_direct(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"fd", "offset", "buf", nullptr};
  int fd;
  long long offset;
  PyObject* obj;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLO", const_cast<char**>(kw), &fd, &offset,
                                   &obj))
    return nullptr;
  Buffer b;
  if (!get_buffer(obj, b, false) || !check_range(offset, b.size())) return nullptr;
  if (!is_aligned(static_cast<uintptr_t>(offset))) {
    PyErr_Format(PyExc_ValueError, "pwrite_direct needs an offset aligned to %zu, got %lld",
                 kAlign, offset);
    return nullptr;
  }
  Status st;
  const char* src = b.data();
  size_t body = b.size() / kAlign * kAlign;
  size_t tail = b.size() - body;
  {
    NoGil nogil;
    direct_write_body(fd, src, body, offset, st);
    if (tail && !st.failed())
      buffered_write(fd, src + body, tail, offset + static_cast<long long>(body), st);
  }
  if (!raise_status(st, "pwrite_direct", fd, offset, b.size())) return nullptr;
  Py_RETURN_NONE;
}

// Parses the (first, itemsize, dst) arguments of split_groups and merge_groups: takes
// dst's buffer and checks the element size and that dst holds whole elements.
bool grouping_args(PyObject* args, PyObject* kwargs, const char* first, PyObject** first_obj,
                   int* itemsize, Buffer& dst) {
  const char* kw[] = {first, "itemsize", "dst", nullptr};
  PyObject* dst_obj;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiO", const_cast<char**>(kw), first_obj,
                                   itemsize, &dst_obj) ||
      !get_buffer(dst_obj, dst, true))
    return false;
  if (*itemsize != 2 && *itemsize != 4 && *itemsize != 8) {
    PyErr_Format(PyExc_ValueError, "itemsize must be 2, 4 or 8, got %d", *itemsize);
    return false;
  }
  if (dst.size() % static_cast<size_t>(*itemsize)) {
    PyErr_Format(PyExc_ValueError, "%zu bytes are not whole %d-byte elements", dst.size(),
                 *itemsize);
    return false;
  }
  return true;
}

PyObject* py_split_groups(PyObject*, PyObject* args, PyObject* kwargs) {
  int itemsize;
  PyObject* src_obj;
  Buffer src, dst;
  if (!grouping_args(args, kwargs, "src", &src_obj, &itemsize, dst) ||
      !get_buffer(src_obj, src, false))
    return nullptr;
  if (dst.size() != src.size()) {
    PyErr_Format(PyExc_ValueError, "dst holds %zu bytes, src %zu", dst.size(), src.size());
    return nullptr;
  }
  {
    NoGil nogil;
    fastckpt_codec::split_groups(reinterpret_cast<const uint8_t*>(src.data()),
                                 src.size() / itemsize, itemsize,
                                 reinterpret_cast<uint8_t*>(dst.data()));
  }
  Py_RETURN_NONE;
}

PyObject* py_merge_groups(PyObject*, PyObject* args, PyObject* kwargs) {
  int itemsize;
  PyObject* groups_obj;
  Buffer dst;
  if (!grouping_args(args, kwargs, "groups", &groups_obj, &itemsize, dst)) return nullptr;
  PyObject* seq = PySequence_Fast(groups_obj, "groups must be a sequence of buffers");
  if (!seq) return nullptr;
  Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  size_t n = dst.size() / itemsize;
  Buffer groups[8];
  const uint8_t* ptrs[8];
  bool ok = count == itemsize;
  if (!ok) PyErr_Format(PyExc_ValueError, "need %d groups, got %zd", itemsize, count);
  for (Py_ssize_t j = 0; ok && j < count; ++j) {
    ok = get_buffer(PySequence_Fast_GET_ITEM(seq, j), groups[j], false);
    if (ok && groups[j].size() != n) {
      PyErr_Format(PyExc_ValueError, "group %zd holds %zu bytes, expected %zu", j,
                   groups[j].size(), n);
      ok = false;
    }
    if (ok) ptrs[j] = reinterpret_cast<const uint8_t*>(groups[j].data());
  }
  Py_DECREF(seq);
  if (!ok) return nullptr;
  {
    NoGil nogil;
    fastckpt_codec::merge_groups(ptrs, n, itemsize, reinterpret_cast<uint8_t*>(dst.data()));
  }
  Py_RETURN_NONE;
}

PyObject* py_huffman_frame(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"src", nullptr};
  PyObject* src_obj;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O", const_cast<char**>(kw), &src_obj))
    return nullptr;
  Buffer src;
  if (!get_buffer(src_obj, src, false)) return nullptr;
  PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(
                                                          fastckpt_codec::huffman_frame_bound(src.size())));
  if (!out) return nullptr;
  size_t len;
  {
    NoGil nogil;
    len = fastckpt_codec::huffman_frame(reinterpret_cast<const uint8_t*>(src.data()),
                                        src.size(),
                                        reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out)));
  }
  if (len == 0) {
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  if (_PyBytes_Resize(&out, static_cast<Py_ssize_t>(len)) < 0) return nullptr;
  return out;
}

// METH_KEYWORDS functions take three arguments; the table's type names two.
// Casting through void(*)() is the sanctioned way to store them.
PyCFunction kw_method(PyCFunctionWithKeywords f) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
}

PyMethodDef kMethods[] = {
    {"pread_into", kw_method(py_pread_into), METH_VARARGS | METH_KEYWORDS,
     "pread_into(fd, offset, buf, threads=1): fill buf from the file at offset."},
    {"pwrite_all", kw_method(py_pwrite_all), METH_VARARGS | METH_KEYWORDS,
     "pwrite_all(fd, offset, buf, threads=1): write all of buf at offset."},
    {"prefault", kw_method(py_prefault), METH_VARARGS | METH_KEYWORDS,
     "prefault(buf, threads=2): read one byte per page of buf."},
    {"pread_direct_into", kw_method(py_pread_direct_into), METH_VARARGS | METH_KEYWORDS,
     "pread_direct_into(fd, offset, buf): fill buf through an O_DIRECT descriptor."},
    {"pwrite_direct", kw_method(py_pwrite_direct), METH_VARARGS | METH_KEYWORDS,
     "pwrite_direct(fd, offset, buf): write buf at an aligned offset through O_DIRECT."},
    {"split_groups", kw_method(py_split_groups), METH_VARARGS | METH_KEYWORDS,
     "split_groups(src, itemsize, dst): rotate elements left a bit, gather byte j in group j."},
    {"merge_groups", kw_method(py_merge_groups), METH_VARARGS | METH_KEYWORDS,
     "merge_groups(groups, itemsize, dst): inverse of split_groups."},
    {"huffman_frame", kw_method(py_huffman_frame), METH_VARARGS | METH_KEYWORDS,
     "huffman_frame(src): a zstd frame of Huffman-coded literals, or None if it cannot help."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "fastckpt._native",
    "Native file I/O and codec kernels for fastckpt (see fastckpt.fileio, fastckpt.codec).",
    -1, kMethods,
    nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m && (PyModule_AddIntConstant(m, "DIRECT_ALIGN", static_cast<long>(kAlign)) < 0 ||
            PyModule_AddIntConstant(m, "MIN_CHUNK", static_cast<long>(kMinChunk)) < 0 ||
            PyModule_AddIntConstant(m, "MAX_THREADS", kMaxThreads) < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
