"""Training-time gate behaviour, as a wrapper around each stock router's forward. Nothing here is saved: `remove`
restores the stock forward and drops the extra parameters before export.

Covers noisy top-k, DIVE's dense soft routing at a temperature, DeepSeek-V3's aux-loss-free selection bias, and the
auxiliary losses (LLaMA-MoE's cv² balance, the Switch/Mixtral aux loss, router z-loss) from the logits it records."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from moefy.train.recipe import Gating

NOISE_MODULE = "moefy_noise"  # the noise layer's name under its router: training-only, never exported


def routers(model) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


class GatingWrapper:
    def __init__(self, model, gating: Gating):
        self.gating = gating
        self.routers = routers(model)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logits, chosen indices) since the last aux_loss
        # Only a training forward's router calls are recorded (`recorded`): not an evaluation's, and not those of
        # backward's recomputation under gradient checkpointing, whose records would hold each layer's recomputed
        # activations and weights until backward ends.
        self.recording = False
        self.loads: dict[int, torch.Tensor] = {}  # router -> tokens routed to each expert since the last end_step
        self.noise: list[torch.nn.Linear] = []
        # The noise weights' names in the model: under FSDP a checkpoint takes them from the gathered full weights.
        self.noise_names: list[str] = []
        if gating.noise > 0:
            qualified = {id(m): name for name, m in model.named_modules()}
            self.noise_names = [f"{qualified[id(r)]}.{NOISE_MODULE}.weight" for r in self.routers]
        # on each router's device: they shift its probabilities in every forward
        self.bias = [torch.zeros(r.weight.shape[0], device=r.weight.device) for r in self.routers]
        for i, router in enumerate(self.routers):
            noise = None
            if gating.noise > 0:
                noise = torch.nn.Linear(router.weight.shape[1], router.weight.shape[0], bias=False,
                                        device=router.weight.device)
                torch.nn.init.zeros_(noise.weight)  # starts as plain top-k; learns where noise helps exploration
                # A submodule of the router, so DDP/FSDP see and synchronise it; `remove` takes it off again.
                router.add_module(NOISE_MODULE, noise)
                self.noise.append(noise)
            router.forward = self._forward(router, noise, i)

    @contextmanager
    def recorded(self):
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for n in self.noise for p in n.parameters()]

    def _forward(self, router, noise, i):
        g = self.gating

        def forward(hidden_states):
            x = hidden_states.reshape(-1, router.weight.shape[1])
            logits = F.linear(x, router.weight)
            if noise is not None and router.training:
                logits = logits + g.noise * torch.randn_like(logits) * F.softplus(noise(x))
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            if g.soft_temperature is not None:  # every expert, weighted by a tempered softmax
                weights = F.softmax(logits.float() / g.soft_temperature, dim=-1)
                index = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
                if self.recording:
                    self.records.append((logits, index))
                return logits, weights.to(logits.dtype), index
            select = probs + self.bias[i] if g.bias_update_rate > 0 else probs  # the bias steers selection only
            index = select.topk(router.top_k, dim=-1).indices
            weights = probs.gather(1, index)
            weights = weights / weights.sum(-1, keepdim=True)
            if self.recording:
                self.records.append((logits, index))
            return logits, weights.to(logits.dtype), index

        return forward

    def aux_loss(self) -> torch.Tensor:
        """Balance and z-losses over the router calls of the forward just run (each micro-batch once)."""
        g, total = self.gating, torch.zeros(())
        for k, (logits, index) in enumerate(self.records):
            i = k % len(self.routers)  # routers are called in layer order, once per forward
            counts = torch.bincount(index.reshape(-1), minlength=self.bias[i].shape[0]).float()
            self.loads[i] = self.loads.get(i, 0) + counts
            probs = F.softmax(logits.float(), dim=-1)
            n = probs.shape[1]
            if g.balance == "cv":
                total = total + g.balance_coef * (_cv2(probs.sum(0)) + _cv2(counts))
            elif g.balance == "switch":
                total = total + g.balance_coef * n * (counts / counts.sum() * probs.mean(0)).sum()
            if g.z_loss_coef:
                total = total + g.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        self.records.clear()
        return total

    def end_step(self, reduce=lambda load: load) -> dict[str, float]:
        """After the optimizer step: update aux-free biases from this step's load (summed over processes by
        `reduce`, so every rank moves its biases identically); report the load imbalance."""
        imbalance = []
        for i, load in self.loads.items():
            load = reduce(load).to(self.bias[i].device)
            imbalance.append(float(_cv2(load).sqrt()))
            if self.gating.bias_update_rate > 0:  # raise the bias of under-loaded experts, lower the over-loaded
                self.bias[i] += self.gating.bias_update_rate * torch.sign(load.mean() - load)
        self.loads.clear()
        return {"load_cv": sum(imbalance) / len(imbalance)} if imbalance else {}

    def state(self, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Biases and noise weights; `full`: the model's full weights by name, gathered from FSDP's shards, where
        each process holds only a shard of the noise layers."""
        out = {f"bias.{i}": b for i, b in enumerate(self.bias)}
        noise = [full[name] for name in self.noise_names] if full is not None else [n.weight for n in self.noise]
        out.update({f"noise.{i}": w.detach() for i, w in enumerate(noise)})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for i in range(len(self.bias)):
            self.bias[i].copy_(state[f"bias.{i}"])  # in place: the bias stays on its router's device
        with torch.no_grad():
            for i, n in enumerate(self.noise):
                n.weight.copy_(state[f"noise.{i}"])

    def remove(self) -> None:
        for router in self.routers:
            del router.forward  # back to the class's stock forward
            if hasattr(router, NOISE_MODULE):
                delattr(router, NOISE_MODULE)


def _cv2(x: torch.Tensor) -> torch.Tensor:
    return x.float().var(unbiased=False) / (x.float().mean() ** 2 + 1e-10)
