"""What ``FastBiRNN``, ``FastBiLSTM`` and ``FastBiGRU`` share: one ``forward``.

``FusedRNNMixin`` sits in front of the nn class (``class FastBiLSTM(FusedRNNMixin, nn.LSTM)``)
and is written once for every cell: backend choice, input normalisation (padded,
``batch_first``, unbatched, packed sorted or not), the nn class's own argument checks and
errors, autocast, packing the results back, and the layer stack on the chosen backend
(``fastbirnn.functional.run_stack``). A cell class adds only its constructor (the nn class's
arguments plus ``backend``) and its cell's own stack arguments (``_cell_config``).

Recurrent state travels as a tuple of tensors: ``(h,)`` for RNN and GRU, ``(h, c)`` for LSTM.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastbirnn import backends, functional, tuning
from fastbirnn.backends import cpp_backend
from fastbirnn.backends.cpu_rule import CallShape


class FusedRNNMixin:
    """The shared ``forward`` of the fastbirnn modules; see the module docstring."""

    #: The cell this class runs ("rnn", "lstm" or "gru"), as the backend registry names it.
    cell: str = "rnn"

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        # Checked here too, so switching backends on a live module fails as early.
        backends.check_name(name, self.cell)
        self._backend = name

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == backends.AUTO else f"{s}, backend={self.backend!r}"

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_backend", backends.AUTO)

    def _update_flat_weights(self) -> None:
        # nn's check that the weights were not swapped (functional_call, reassignment), with
        # direct dict lookups: Module.__getattr__ costs ~1 µs a name on the hot path.
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

    # ---- which backend runs ---------------------------------------------------------------

    def _fused_unsupported(self) -> Optional[str]:
        """Why no fused backend can run this module's configuration, or None."""
        return None

    def selected_backend(self, input: Tensor | PackedSequence) -> str:
        """The backend that ``forward`` runs for this input (``'torch'`` is the nn class).

        A named kernel backend is returned as is; whether it can run the input is checked
        in ``forward`` after the nn class's own argument checks, so bad input fails the same.
        """
        data = input.data if isinstance(input, PackedSequence) else input
        if data.numel() == 0:
            return backends.TORCH  # nothing to compute: the nn class returns or raises
        if self.backend != backends.AUTO:
            return self.backend
        if self._fused_unsupported() is not None:
            return backends.TORCH
        run_dtype = _autocast_dtype(data) or data.dtype
        if run_dtype != data.dtype and not (data.device.type == "cpu"
                                            and run_dtype == torch.bfloat16):
            return backends.TORCH  # autocast to a dtype no fused CPU path computes in
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
            return backends.TORCH  # the nn class raises its own error for this input
        training = torch.is_grad_enabled() and (
            data.requires_grad or any(w.requires_grad for w in self._flat_weights)
        )
        if torch.compiler.is_compiling():
            # Dynamo cannot trace get_num_threads(): the count of the last eager call.
            return self._resolve_auto(data, run_dtype, batch_size, seq_len, training,
                                      _threads_seen[0])
        threads = _threads_seen[0] = torch.get_num_threads()
        # The choice depends only on this signature: cached per module, off the hot path.
        key = (batch_size, seq_len, data.dtype, run_dtype, data.device, training, threads,
               tuning._enabled, isinstance(input, PackedSequence))
        backend = self.__dict__.get("_auto_cache", {}).get(key)
        if backend is None:
            backend = self._resolve_auto(data, run_dtype, batch_size, seq_len, training,
                                         threads)
            if tuning._enabled and data.device.type == "cpu":
                backend = self._autotuned(input, data, backend, key, training)
            self._remember("_auto_cache", key, backend)
        return backend

    def _autotuned(self, input, data: Tensor, rule_choice: str, call_key: tuple,
                   training: bool) -> str:
        """``fastbirnn.autotune``: the rule's choice or the other CPU candidate, whichever
        ran this signature faster here (measured once per process; fastbirnn/tuning.py)."""
        cpp_runs = (backends.get("cpp").supports(self.cell)
                    and backends.cannot_run("cpp", data) is None)
        if not cpp_runs:
            return rule_choice
        other = backends.TORCH if rule_choice != backends.TORCH else "cpp"
        signature = (type(self).__name__, self.input_size, self.hidden_size, self.num_layers,
                     self.bias, self.bidirectional, self.batch_first, self.proj_size,
                     self.dropout if self.training else 0.0, self._cell_config().get(
                         "nonlinearity"), *call_key)
        return tuning.choose(signature, [rule_choice, other],
                             tuning.step_runner(self, input, training=training))

    def _forward_on(self, backend: str, input):
        """``forward`` with ``backend`` instead of the module's (for the calibration)."""
        if backend == backends.TORCH:
            return super().forward(input)
        return self._fused_forward(input, None, backend)

    def _resolve_auto(self, data, run_dtype, batch_size, seq_len, training, threads) -> str:
        if not isinstance(batch_size, int) or not isinstance(seq_len, int):
            # A dynamic size under torch.compile/export: the graph serves every size, so
            # decide without branching on it (as for one row and one step).
            batch_size, seq_len = 1, 1
        call = CallShape(
            batch=batch_size, seq=seq_len, hidden=self.hidden_size, input=self.input_size,
            layers=self.num_layers,
            bidirectional=self.bidirectional, dtype=run_dtype, training=training,
            threads=threads, cell=self.cell, proj_size=self.proj_size,
            isa=cpp_backend.cpu_isa() or "scalar", bf16_tiles=cpp_backend.has_bf16_tiles(),
        )
        return backends.resolve_auto(data, call, self.cell)

    def forward(self, input, hx=None):
        key = self._call_signature(input, hx)
        if key is not None:
            entry = self.__dict__.get("_calls", {}).get(key)
            if entry is not None:  # this signature went through every check before
                if entry == backends.TORCH:
                    return super().forward(input, hx)
                # (_call_signature has just checked the weights' identity)
                stack, config = entry
                output, final = stack(input, None, None, self._flat_weights, **config)
                return output, final[0] if len(final) == 1 else final
        backend = self.selected_backend(input)
        if backend == backends.TORCH:
            if key is not None:
                self._remember("_calls", key, backends.TORCH)
            return super().forward(input, hx)
        result = self._fused_forward(input, hx, backend)
        if key is not None:
            stack = backends.get(backend).cell_stacks[self.cell]
            self._remember("_calls", key, functional.bind_stack(stack, self._stack_config()))
        return result

    # ---- the hot path: a call signature that passed every check before ----------------------

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
            self._backend, self.training, self.dropout, self.batch_first, input.shape,
            input.dtype, input.device, grad,
            grad and (input.requires_grad or any(w.requires_grad for w in weights)),
            weights[0].dtype, weights[0].device, len(weights), torch.get_num_threads(),
            tuning._enabled,
        )

    def _remember(self, cache_name: str, key, value) -> None:
        """Store in one of the module's memo dicts, emptied at 256 entries (bounded)."""
        cache = self.__dict__.setdefault(cache_name, {})
        if len(cache) >= 256:
            cache.clear()
        cache[key] = value

    # ---- the fused path -------------------------------------------------------------------

    def _states(self, hx) -> Optional[tuple[Tensor, ...]]:
        """The nn class's ``hx`` as a tuple of state tensors (None stays None)."""
        if hx is None:
            return None
        return tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)

    def _hx_has_nn_form(self, hx) -> bool:
        """Whether ``hx`` has the nn class's form: ``(h_0, c_0)`` for the LSTM, else a tensor."""
        if self.cell != "lstm":
            return isinstance(hx, Tensor)
        return isinstance(hx, (tuple, list)) and len(hx) == 2 and all(
            isinstance(s, Tensor) for s in hx
        )

    def _hx(self, states: tuple[Tensor, ...]):
        """The inverse of ``_states``: what the nn class takes and returns as hidden state."""
        return states if len(states) > 1 else states[0]

    def _fused_forward(self, input, hx, backend: str):
        # Normalisation mirrors the nn classes' forward; wherever they raise, they are called
        # to raise, so every error is theirs, word for word.
        self._update_flat_weights()
        if hx is not None and not self._hx_has_nn_form(hx):
            return super().forward(input, hx)  # raises the nn class's own error for this hx
        states = self._states(hx)
        is_packed = isinstance(input, PackedSequence)
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is not None:
                if any(s.dim() != 3 for s in states):
                    return super().forward(input, hx)  # raises the nn class's own error
                states = self._states(self.permute_hidden(hx, sorted_indices))
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                return super().forward(input, hx)  # raises the nn class's ValueError
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if states is not None:
                if any(s.dim() != input.dim() for s in states):
                    return super().forward(input, hx)  # raises the nn class's RuntimeError
                if not is_batched:
                    states = tuple(s.unsqueeze(1) for s in states)
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            data = input
        if states is None:
            # Zero initial states always have the expected sizes: only the input needs
            # checking, and the kernels start from zeros themselves.
            self.check_input(data, batch_sizes)
        else:
            self.check_forward_args(data, self._hx(states), batch_sizes)
        if _under_function_transform():
            raise RuntimeError(
                f"fastbirnn backend {backend!r} does not support torch.func transforms or "
                "forward-mode AD; use backend='auto' or 'torch' there"
            )
        reason = self._fused_unsupported()
        if reason is not None:
            raise RuntimeError(f"fastbirnn backend {backend!r} cannot run this module: {reason}")
        weights = self._flat_weights
        autocast_dtype = _autocast_dtype(data)
        if autocast_dtype is None:
            self._check_same_device_and_dtype(data, states)
            backends.require(backend, data)
        else:
            # As the nn classes under autocast: input, states and weights are cast and the
            # outputs come back in the autocast dtype. A backend without kernels for it
            # computes in fp32.
            self._check_same_device_and_dtype(data, None)
            run_dtype = autocast_dtype
            if backends.get(backend).unsupported_reason(data.new_empty(0, dtype=run_dtype)):
                run_dtype = torch.float32
            data = data.to(run_dtype)
            if states is not None:
                states = tuple(s.to(run_dtype) for s in states)
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
            output, final = self._run_layers(x, lengths, states, weights, backend, batch_first)
        else:
            with torch.autocast(data.device.type, enabled=False):
                output, final = self._run_layers(
                    x, lengths, states, weights, backend, batch_first
                )
            result_dtype = self._autocast_result_dtype(data.device.type, autocast_dtype)
            output = output.to(result_dtype)
            final = tuple(s.to(result_dtype) for s in final)

        if is_packed:
            packed = pack_padded_sequence(output, lengths.cpu())
            output = PackedSequence(packed.data, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(self._hx(final), unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            final = tuple(s.squeeze(1) for s in final)
        return output, self._hx(final)

    def _run_layers(self, x, lengths, states, weights, backend: str, batch_first: bool):
        """(output, final states tuple) of the layer stack on ``backend``."""
        stack = backends.get(backend).cell_stacks[self.cell]
        config = dict(self._stack_config(), batch_first=batch_first)
        return functional.run_stack(stack, x, lengths, states, weights, **config)

    def _autocast_result_dtype(self, device_type: str, autocast_dtype: torch.dtype):
        """The dtype the nn class returns under autocast (its kernels decide; see subclasses)."""
        return autocast_dtype

    def _stack_config(self) -> dict:
        """``run_stack``'s keyword arguments for this module."""
        return dict(
            num_layers=self.num_layers,
            num_directions=2 if self.bidirectional else 1,
            bias=self.bias,
            dropout=self.dropout,
            training=self.training,
            batch_first=self.batch_first,
            **self._cell_config(),
        )

    def _cell_config(self) -> dict:
        """The cell's own layer-stack arguments (see subclasses)."""
        return {}

    def _check_same_device_and_dtype(self, data: Tensor, states) -> None:
        weight = self._flat_weights[0]
        for name, tensor in (("input", data), *(("hx", s) for s in states or ())):
            if tensor.device != weight.device:
                raise RuntimeError(
                    f"Expected {name} and the {type(self).__name__} weights on the same device, "
                    f"got {name} on {tensor.device} and weights on {weight.device}"
                )
        for state in states or ():
            if state.dtype != data.dtype:
                raise RuntimeError(
                    f"Expected hx dtype {data.dtype} to match the input's, got {state.dtype}"
                )


# torch.get_num_threads() of the last eager call, for choices made while compiling.
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
