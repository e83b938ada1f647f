"""MAAF's LSTM text encoder (yahoo/maaf ``src/maaf/models/text_model.py``, ``TextLSTMModel`` with sequence output).

Word embedding → one-direction LSTM → dropout + Linear on every position. The official model runs the LSTM
over the zero-padded batch (no packing) and masks padding later, in the fusion and in the text mean; since the padding
follows the valid tokens, a unidirectional LSTM's outputs at valid positions do not depend on it. We do the same, with
``batch_first=True`` and no ``pack_padded_sequence`` (which fails under ``torch.onnx.export(dynamo=True)``).
Parameter names match the official ones (``embedding_layer``, ``lstm``, ``fc_output.1``).

ONNX export: ``torch.export`` decomposes ``aten.lstm`` into one step per time step and so specialises the sequence
length to the sample's, which breaks a dynamic ``sequence`` axis downstream (concatenation with image tokens,
reshapes). Under ``torch.onnx.export`` the LSTM is therefore emitted directly as the ONNX ``LSTM`` operator through
``torch.onnx.ops.symbolic`` (seq-first layout, gates reordered from PyTorch's i,f,g,o to ONNX's i,o,f,c), which keeps
the sequence axis symbolic; eager PyTorch runs ``nn.LSTM``.
"""

from __future__ import annotations

import torch
from torch import nn


def lookup(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` as ``index_select`` (one ONNX ``Gather``). Not ``nn.Embedding``/``F.embedding``: the ONNX
    exporter names that value "embedding", which collides with the graphs' output name "embedding" (the renamed
    output then breaks the graph's single-assignment form and ``onnx.checker`` rejects it)."""
    return weight.index_select(0, ids.reshape(-1)).reshape(*ids.shape, weight.shape[1])


class LSTMTextEncoder(nn.Module):
    """``input_ids`` (B, T) → per-token features (B, T, out_dim); padded positions carry junk to be masked."""

    def __init__(
        self, vocab_size: int, word_embed_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 1
    ) -> None:
        super().__init__()
        self.embedding_layer = nn.Embedding(vocab_size, word_embed_dim)
        self.lstm = nn.LSTM(word_embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        # Dropout kept as index 0 so the Linear's keys are ``fc_output.1.*`` like the official checkpoints.
        self.fc_output = nn.Sequential(nn.Dropout(p=0.1), nn.Linear(hidden_dim, out_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` (B, T) int64 → (B, T, out_dim)."""
        x = lookup(self.embedding_layer.weight, input_ids)
        # Only under the dynamo ONNX exporter (torch.export tracing); the legacy TorchScript exporter maps nn.LSTM
        # to ONNX LSTM by itself.
        if torch.onnx.is_in_onnx_export() and torch.compiler.is_exporting():
            out = self._onnx_lstm(x)
        else:
            out, _ = self.lstm(x)  # zero initial state, as the official forward_lstm_
        return self.fc_output(out)

    def _onnx_lstm(self, x: torch.Tensor) -> torch.Tensor:
        """The LSTM as ONNX ``LSTM`` nodes (one per layer), with a symbolic sequence length."""
        H = self.lstm.hidden_size
        B, T = x.shape[0], x.shape[1]
        h = x.transpose(0, 1)  # (T, B, E): layout 0, the one every ONNX consumer (TensorRT included) takes

        def onnx_gates(t: torch.Tensor) -> torch.Tensor:
            # PyTorch gate order i, f, g, o → ONNX i, o, f, c (slices, not split: they constant-fold to initializers)
            return torch.cat([t[0:H], t[3 * H : 4 * H], t[H : 2 * H], t[2 * H : 3 * H]], dim=0)

        for layer in range(self.lstm.num_layers):
            w = onnx_gates(getattr(self.lstm, f"weight_ih_l{layer}"))[None]
            r = onnx_gates(getattr(self.lstm, f"weight_hh_l{layer}"))[None]
            b_ih = onnx_gates(getattr(self.lstm, f"bias_ih_l{layer}"))
            b_hh = onnx_gates(getattr(self.lstm, f"bias_hh_l{layer}"))
            b = torch.cat([b_ih, b_hh])[None]
            y = torch.onnx.ops.symbolic("LSTM", (h, w, r, b), {"hidden_size": H}, dtype=h.dtype, shape=(T, 1, B, H))
            h = y[:, 0]  # (T, B, H): drop the num_directions axis
        return h.transpose(0, 1)


__all__ = ["LSTMTextEncoder", "lookup"]
