// The C++ CPU engine's entry points: the stack ops (torch.ops.fastbirnn_cpp, stack.h) and the
// extension module fastbirnn._C (the eager fast path and a few queries).

#include <torch/extension.h>
#include <torch/library.h>

#include "activations.h"
#include "blas.h"
#include "buffers.h"
#include "stack.h"
#include "team.h"
#include "tiles_bf16.h"

TORCH_LIBRARY(fastbirnn_cpp, m) {
  // cell: 'rnn_tanh', 'rnn_relu', 'lstm' or 'gru'; c0 and the returned c_n (empty otherwise)
  // only for the LSTM.
  m.def(
      "stack(str cell, Tensor x, Tensor? h0, Tensor? c0, Tensor[] weights, Tensor? lengths, "
      "int num_layers, bool bidirectional, bool has_biases, bool batch_first) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "stack_forward_impl(str cell, Tensor x, Tensor? h0, Tensor? c0, Tensor[] weights, "
      "Tensor? lengths, int num_layers, bool bidirectional, bool has_biases, bool batch_first, "
      "bool keep) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "stack_backward_impl(str cell, Tensor? grad_out, Tensor? grad_hn, Tensor? grad_cn, "
      "Tensor x, Tensor? h0, Tensor? c0, Tensor[] weights, Tensor? lengths, Tensor out, "
      "Tensor mid, Tensor gates, Tensor saved, int num_layers, bool bidirectional, "
      "bool has_biases, bool batch_first, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(fastbirnn_cpp, CPU, m) {
  m.impl("stack", &fastbirnn::stack_no_autograd);
  m.impl("stack_forward_impl", &fastbirnn::stack_forward_impl);
  m.impl("stack_backward_impl", &fastbirnn::stack_backward_impl);
}

TORCH_LIBRARY_IMPL(fastbirnn_cpp, Autograd, m) {
  m.impl("stack", &fastbirnn::stack_autograd);
}

namespace {

// Installs the Python function the autograd node calls for gradients of gradients (stack.h's
// DifferentiableBackward): fn(cell, inputs, grads, num_layers, bidirectional, has_biases,
// batch_first) -> a list of gradients, None where there is none.
void set_differentiable_backward(py::function fn) {
  // Kept for the life of the process: it must outlive every graph that may call it, and a
  // Python object must not be destroyed after the interpreter is gone.
  auto* kept = new py::function(std::move(fn));
  fastbirnn::set_differentiable_backward(
      [kept](const std::string& cell, const std::vector<at::Tensor>& inputs,
             const std::vector<at::Tensor>& grads, int64_t num_layers, bool bidirectional,
             bool has_biases, bool batch_first) {
        py::gil_scoped_acquire gil;
        auto optional = [](const std::vector<at::Tensor>& ts) {
          py::list list;
          for (const auto& t : ts) list.append(t.defined() ? py::cast(t) : py::none());
          return list;
        };
        py::object result = (*kept)(cell, optional(inputs), optional(grads), num_layers,
                                    bidirectional, has_biases, batch_first);
        std::vector<at::Tensor> out;
        for (const py::handle item : result)
          out.push_back(item.is_none() ? at::Tensor() : item.cast<at::Tensor>());
        return out;
      });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbirnn fused C++ CPU kernels (ops live in torch.ops.fastbirnn_cpp)";
  m.def("stack_eager", &fastbirnn::stack_eager,
        "torch.ops.fastbirnn_cpp.stack(cell, x, None, None, weights, None, ...) without boxed "
        "arguments");
  m.def("has_blas", &fastbirnn::have_blas, "Whether an optimised BLAS was found in libtorch");
  m.def("has_bf16_tiles", [] { return fastbirnn::kBf16Tiles; },
        "Whether bf16 calls run their products on AVX512-BF16 tiles (else fp32 products on "
        "bf16-rounded operands)");
  m.def("cpu_isa", [] { return fastbirnn::isa_name(fastbirnn::kIsa); },
        "The engine's ISA level: 'avx512', 'avx2' or 'scalar' (the CPU's, lowered by "
        "FASTBIRNN_ISA)");
  m.def("cpu_isa_error", &fastbirnn::isa_request_error,
        "Why FASTBIRNN_ISA was not understood, or '' (the engine then uses the CPU's level)");
  m.def("release_scratch", &fastbirnn::release_scratch,
        "Free the scratch buffers the engine keeps for this thread, and the dropped results "
        "kept for reuse; returns the bytes freed");
  m.def("kept_scratch_bytes", [] { return fastbirnn::ScratchCaches::instance().kept_bytes(); },
        "The bytes of scratch buffers all threads keep together");
  m.def("idle_result_bytes", [] { return fastbirnn::RecycledResults::instance().idle_bytes(); },
        "The bytes of dropped results kept for the next call's (RecycledResults)");
  m.def("set_scratch_limit",
        [](int64_t bytes) { return fastbirnn::ScratchCaches::instance().set_limit(bytes); },
        "Cap the scratch all threads keep (bytes), and the dropped results kept for reuse "
        "(the same cap, apart); returns the previous cap");
  m.def("advises_huge_pages", [] { return fastbirnn::kAdviseHugePages; },
        "Whether large buffers are advised as transparent huge pages (FASTBIRNN_HUGE_PAGES; "
        "unset: unless the hypervisor reclaims free pages)");
  m.def("huge_pages_error", [] { return fastbirnn::kHugePageAdvice.error; },
        "Why FASTBIRNN_HUGE_PAGES was not understood, or ''");
  m.def("hypervisor_reclaims_free_pages", &fastbirnn::hypervisor_reclaims_free_pages,
        "Whether a virtio balloon reports free pages to the host (sysfs)");
  m.def("set_differentiable_backward", &set_differentiable_backward,
        "Install the function the stack's autograd node calls under create_graph=True");
  fastbirnn::team_mode();  // FASTBIRNN_TEAM is read once, as the extension loads
  m.def("team_crowding",
        [] {
          const auto& c = fastbirnn::Crowding::shared();
          return std::make_tuple(c.inline_left(), c.stretch(), c.inline_runs());
        },
        "The crowding back-off (team.h): (inline runs left, next stretch, inline runs so far)");
  m.def("record_team_run",
        [](int64_t run_ns, int64_t stalled_ns, int64_t preemptions) {
          fastbirnn::Crowding::shared().record(run_ns, stalled_ns, preemptions);
        },
        py::arg("run_ns"), py::arg("stalled_ns"), py::arg("preemptions") = -1,
        "Feeds one team run's time and stalls (ns) and its workers' involuntary context "
        "switches to the crowding back-off (tests)");
  m.def("reset_team_crowding", [] { fastbirnn::Crowding::shared().reset(); },
        "Forgets any crowding: the next team runs on threads");
  m.def("team_barriers_met",
        [] { return fastbirnn::Team::barriers_met().load(std::memory_order_relaxed); },
        "Barriers the engine's team workers have met since the extension loaded (counted per "
        "thread; tests)");
  m.def("step_projected_layers",
        [] { return fastbirnn::step_projected_layers().load(std::memory_order_relaxed); },
        "Layers whose forward projected its input step by step inside the recurrence since the "
        "extension loaded (tests)");
  m.def("team_mode", &fastbirnn::team_mode,
        "'openmp' (teams run on ATen's OpenMP threads) or 'inline' (on the calling thread)");
}
