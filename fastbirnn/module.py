"""``FastBiRNN``: ``nn.RNN`` with a fused recurrence, bidirectional by default."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastbirnn import backends
from fastbirnn.backends.cpu_rule import CallShape
from fastbirnn.functional import birnn_forward


class FastBiRNN(nn.RNN):
    r"""Drop-in for :class:`torch.nn.RNN` whose recurrence runs both directions at once.

    Same arguments, parameters, ``state_dict``, inputs and outputs as ``nn.RNN``, except that
    ``bidirectional`` defaults to ``True`` and there is one more argument:

    backend: ``'auto'`` (the fastest correct backend for the input's device, falling back to
        ``nn.RNN``), ``'triton'`` (CUDA; CPU tensors only under ``TRITON_INTERPRET=1``),
        ``'cpp'`` (fused C++ CPU kernel), ``'reference'`` (pure-PyTorch loop, for testing) or
        ``'torch'`` (``nn.RNN`` itself). A named backend that cannot run raises an error
        saying why; ``'auto'`` never does.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        backends.check_name(backend)  # before nn.RNN allocates anything
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            nonlinearity=nonlinearity,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        # Checked here too, so switching backends on a live module fails as early.
        backends.check_name(name)
        self._backend = name

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == backends.AUTO else f"{s}, backend={self.backend!r}"

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_backend", backends.AUTO)

    def _update_flat_weights(self) -> None:
        # nn.RNN's check that the weights were not swapped (functional_call, reassignment),
        # with direct dict lookups: Module.__getattr__ costs ~1 µs a name on the hot path.
        if torch.jit.is_scripting():
            return
        params, attrs = self._parameters, self.__dict__
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            if name in params and name not in attrs:
                weight = params[name]
            else:
                weight = getattr(self, name, None)
            if weight is not None and ref is not None and ref() is not weight:
                self._init_flat_weights()
                return

    def selected_backend(self, input: Tensor | PackedSequence) -> str:
        """The backend that ``forward`` runs for this input (``'torch'`` is nn.RNN itself).

        A named kernel backend is returned as is; whether it can run the input is checked
        in ``forward`` after nn.RNN's own argument checks, so bad input fails as in nn.RNN.
        """
        data = input.data if isinstance(input, PackedSequence) else input
        if data.numel() == 0:
            return backends.TORCH  # nothing to compute: nn.RNN returns or raises as it should
        if self.backend != backends.AUTO:
            return self.backend
        if _autocast_dtype(data) is not None:
            return backends.TORCH  # nn.RNN defines autocast's dtype rules
        if _under_function_transform():
            return backends.TORCH  # the fused ops define no forward-mode AD or vmap rule
        if isinstance(input, PackedSequence):
            batch_size, seq_len = int(input.batch_sizes[0]), len(input.batch_sizes)
        elif data.dim() == 3:
            batch_size = data.size(0 if self.batch_first else 1)
            seq_len = data.size(1 if self.batch_first else 0)
        elif data.dim() == 2:
            batch_size, seq_len = 1, data.size(0)
        else:
            return backends.TORCH  # nn.RNN raises its own error for this input
        training = torch.is_grad_enabled() and (
            data.requires_grad or any(w.requires_grad for w in self._flat_weights)
        )
        if torch.compiler.is_compiling():
            # Dynamo cannot trace get_num_threads(): the count of the last eager call.
            return self._resolve_auto(data, batch_size, seq_len, training, _threads_seen[0])
        threads = _threads_seen[0] = torch.get_num_threads()
        # The choice depends only on this signature: cached per module, off the hot path.
        key = (batch_size, seq_len, data.dtype, data.device, training, threads)
        cache = self.__dict__.get("_auto_cache")
        if cache is None:
            cache = self.__dict__["_auto_cache"] = {}
        backend = cache.get(key)
        if backend is None:
            if len(cache) >= 256:
                cache.clear()
            backend = cache[key] = self._resolve_auto(
                data, batch_size, seq_len, training, threads)
        return backend

    def _resolve_auto(self, data, batch_size, seq_len, training, threads) -> str:
        if not isinstance(batch_size, int) or not isinstance(seq_len, int):
            # A dynamic size under torch.compile/export: the graph serves every size, so
            # decide without branching on it (as for one row and one step).
            batch_size, seq_len = 1, 1
        call = CallShape(
            batch=batch_size, seq=seq_len, hidden=self.hidden_size, layers=self.num_layers,
            bidirectional=self.bidirectional, dtype=data.dtype, training=training,
            threads=threads,
        )
        return backends.resolve_auto(data, self.hidden_size, batch_size, call)

    def forward(self, input, hx: Optional[Tensor] = None):
        key = self._call_signature(input, hx)
        if key is not None:
            entry = self.__dict__.get("_calls", {}).get(key)
            if entry is not None:  # this signature went through every check before
                if entry == backends.TORCH:
                    return super().forward(input, hx)
                # (_call_signature has just checked the weights' identity)
                return entry[0](input, None, None, self._flat_weights, **entry[1])
        backend = self.selected_backend(input)
        if backend == backends.TORCH:
            if key is not None:
                self._remember(key, backends.TORCH)
            return super().forward(input, hx)
        result = self._fused_forward(input, hx, backend)
        stack_forward = backends.get(backend).stack_forward
        if key is not None and stack_forward is not None:
            self._remember(key, (stack_forward, self._stack_config()))
        return result

    def _call_signature(self, input, hx):
        """A key for the hot path's cache, or None where every check must run again.

        Only the common call is cached: a plain 3-D tensor, no h_0, no autocast, no torch.func
        transform, not while compiling. The key holds everything the backend choice and the
        argument checks depend on (shapes, dtypes, devices, grad mode, requires_grad, threads,
        backend, training); the weights' identity is still checked on every call.
        """
        if hx is not None or type(input) is not Tensor or input.dim() != 3:
            return None
        if torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling():
            return None
        if _under_function_transform():
            return None
        self._update_flat_weights()
        weights = self._flat_weights
        grad = torch.is_grad_enabled()
        return (
            self._backend, self.training, self.dropout, self.batch_first, input.shape, input.dtype, input.device, grad,
            grad and (input.requires_grad or any(w.requires_grad for w in weights)),
            weights[0].dtype, weights[0].device, len(weights), torch.get_num_threads(),
        )

    def _remember(self, key, entry) -> None:
        calls = self.__dict__.setdefault("_calls", {})
        if len(calls) >= 256:
            calls.clear()
        calls[key] = entry

    def _stack_config(self) -> dict:
        return dict(
            num_layers=self.num_layers,
            num_directions=2 if self.bidirectional else 1,
            bias=self.bias,
            nonlinearity="relu" if self.mode == "RNN_RELU" else "tanh",
            dropout=self.dropout,
            training=self.training,
            batch_first=self.batch_first,
        )

    def _fused_forward(self, input, hx: Optional[Tensor], backend: str):
        # Input normalisation mirrors nn.RNN.forward, so errors and shapes match it.
        self._update_flat_weights()
        is_packed = isinstance(input, PackedSequence)
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead"
                )
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                )
            data = input
            batch = input.size(batch_dim)
        if hx is None:
            # A zero h_0 always has the expected size: only the input needs checking, and the
            # kernels start from zeros themselves (fewer small ops on the hot path).
            self.check_input(data, batch_sizes)
        else:
            self.check_forward_args(data, hx, batch_sizes)
        if _under_function_transform():
            raise RuntimeError(
                f"fastbirnn backend {backend!r} does not support torch.func transforms or "
                "forward-mode AD; use backend='auto' or 'torch' there"
            )
        weights = self._flat_weights
        autocast_dtype = _autocast_dtype(data)
        if autocast_dtype is None:
            self._check_same_device_and_dtype(data, hx)
            backends.require(backend, data)
        else:
            # As nn.RNN under autocast: input, h_0 and weights are cast and the outputs come
            # back in the autocast dtype. A backend without kernels for it computes in fp32.
            self._check_same_device_and_dtype(data, None)
            run_dtype = autocast_dtype
            if backends.get(backend).unsupported_reason(data.new_empty(0, dtype=run_dtype)):
                run_dtype = torch.float32
            data = data.to(run_dtype)
            hx = hx.to(run_dtype) if hx is not None else None
            weights = [w.to(run_dtype) for w in weights]
            backends.require(backend, data)
            if not is_packed:
                input = data

        if is_packed:
            # Padded, in the packed (sorted) order; the kernels take lengths instead.
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            lengths = lengths.to(data.device)
        else:
            x, lengths = input, None  # every row runs all steps

        batch_first = self.batch_first and not is_packed
        if autocast_dtype is None:
            output, hidden = self._run_layers(x, lengths, hx, weights, backend, batch_first)
        else:
            with torch.autocast(data.device.type, enabled=False):
                output, hidden = self._run_layers(x, lengths, hx, weights, backend, batch_first)
            output, hidden = output.to(autocast_dtype), hidden.to(autocast_dtype)

        if is_packed:
            packed = pack_padded_sequence(output, lengths.cpu())
            output = PackedSequence(packed.data, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = hidden.squeeze(1)
        return output, hidden

    def _run_layers(self, x, lengths, hx, weights, backend: str, batch_first: bool):
        # nn.RNN runs what its mode says (set at construction), not the attribute.
        config = self._stack_config()
        config["batch_first"] = batch_first
        return birnn_forward(x, lengths, hx, weights, backend=backend, **config)

    def _check_same_device_and_dtype(self, data: Tensor, hx: Optional[Tensor]) -> None:
        weight = self._flat_weights[0]
        for name, tensor in (("input", data), ("hx", hx)):
            if tensor is not None and tensor.device != weight.device:
                raise RuntimeError(
                    f"Expected {name} and the RNN weights on the same device, got {name} on "
                    f"{tensor.device} and weights on {weight.device}"
                )
        if hx is not None and hx.dtype != data.dtype:
            raise RuntimeError(
                f"Expected hx dtype {data.dtype} to match the input's, got {hx.dtype}"
            )


_threads_seen = [torch.get_num_threads()]


def _autocast_dtype(data: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs RNNs in for this input, or None where it leaves it alone."""
    if not torch._C._is_any_autocast_enabled():  # the cheap check first: hot path
        return None
    device_type = data.device.type
    # Autocast casts floating point tensors except float64, which it never touches.
    if data.is_floating_point() and data.dtype != torch.float64:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    return None


def _under_function_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) or forward-mode AD is active."""
    if torch.compiler.is_compiling():
        return False  # the compiler traces transforms its own way
    return (
        torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd.forward_ad._current_level >= 0
    )
