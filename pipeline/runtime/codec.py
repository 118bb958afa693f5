"""The one owner of the message format between module k and module k+1.

A message becomes a ``Frame``: a few opaque integers (kind, epoch, step, ...) and the packet's
tensors in wire order — labels, module output, then the context (image, register). The codec
is built from the ContextPlan, so both ends of a link know how many tensors a packet of that
link holds, and the receiving end checks each packet against the module it feeds. The
transport moves frames and knows nothing of what they mean.
"""

from __future__ import annotations

from pipeline.errors import StageFailure
from pipeline.model.context import ContextPlan
from pipeline.model.networks.base import Shape
from pipeline.runtime.messages import EpochEnd, Eval, Message, SavePoint, Stop, Train
from pipeline.runtime.packet import Packet
from pipeline.runtime.run_order import Position
from pipeline.runtime.transport import Frame

TRAIN, EVAL, END_EPOCH, STOP, SAVE = 1, 2, 3, 4, 5


def carried_inputs(plan: ContextPlan, receiver: int) -> list[int]:
    """The modules whose input a packet into ``receiver`` carries after its labels, in wire order: the
    receiver's own (its features: the sender's output), module 0's (the image) where the plan sends it, then
    the register's. The performance model sizes a packet from this list (pipeline/performance/traffic.py)."""
    return [receiver, *([0] if plan.carries_image(receiver) else []), *plan.register_sources(receiver)]


class MessageCodec:
    """Encodes what module ``receiver - 1`` sends and decodes what module ``receiver`` gets."""

    def __init__(self, plan: ContextPlan, receiver: int, input_shape: Shape, dense: bool = False) -> None:
        self.receiver = receiver
        self.has_image = plan.carries_image(receiver)
        self.tensors = 1 + len(carried_inputs(plan, receiver))  # the labels, then those inputs
        self.rank = 1 + len(input_shape)
        # Segmentation evaluates whole images of any size: only the channels are fixed there.
        self.feature_shape: Shape = input_shape[:1] if dense else input_shape

    @property
    def max_tensors(self) -> int:
        """Tensors in the largest message of this link: the transport sizes its header by it."""
        return self.tensors

    def encode(self, message: Message) -> Frame:
        if isinstance(message, Train):
            return Frame((TRAIN, message.epoch, message.step, message.samples, message.entry),
                         message.packet.tensors())
        if isinstance(message, Eval):
            return Frame((EVAL, message.epoch), message.packet.tensors())
        if isinstance(message, EpochEnd):
            at = message.resume_at
            return Frame((END_EPOCH, message.epoch, at.epoch, at.batch, at.step, int(message.final)), [])
        if isinstance(message, SavePoint):
            at = message.resume_at
            return Frame((SAVE, at.epoch, at.batch, at.step), [])
        return Frame((STOP, int(message.preempted)), [])

    def decode(self, frame: Frame) -> Message:
        kind, *values = frame.meta
        if kind == TRAIN:
            epoch, step, samples, entry = values[:4]
            return Train(epoch, step, samples, self._packet(frame), entry)
        if kind == EVAL:
            return Eval(values[0], self._packet(frame))
        if kind == END_EPOCH:
            epoch, at_epoch, at_batch, at_step, final = values[:5]
            return EpochEnd(epoch, Position(at_epoch, at_batch, at_step), bool(final))
        if kind == SAVE:
            at_epoch, at_batch, at_step = values[:3]
            return SavePoint(Position(at_epoch, at_batch, at_step))
        if kind == STOP:
            return Stop(bool(values[0]))
        raise StageFailure(f"module {self.receiver} got a message of unknown kind {kind}; the stream is corrupt")

    def _packet(self, frame: Frame) -> Packet:
        """Rebuild the packet, checking it is what this module was built for."""
        tensors = frame.tensors
        features = tensors[1] if len(tensors) > 1 else None
        fixed = None if features is None else tuple(features.shape[1 : 1 + len(self.feature_shape)])
        if (len(tensors) != self.tensors or features is None or features.dim() != self.rank
                or fixed != self.feature_shape):
            got = "none" if features is None else list(features.shape)
            spatial = ", height, width" if len(self.feature_shape) < self.rank - 1 else ""
            wanted = ", ".join(map(str, self.feature_shape)) + spatial
            raise StageFailure(
                f"module {self.receiver} got {len(tensors)} tensors with features {got} from module "
                f"{self.receiver - 1}; it expects {self.tensors} tensors with features [batch, {wanted}]; "
                f"every rank must run the same config"
            )
        return Packet.from_tensors(tensors, self.has_image)

    def closes(self, message: Message) -> bool:
        return isinstance(message, Stop)
