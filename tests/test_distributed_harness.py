"""The multi-process test harness itself: a rendezvous port taken by someone else is retried."""

import socket

import distributed
import pytest
import torch


def _rank():
    import torch.distributed as dist

    from an_megatron.parallel import initialize_parallel

    initialize_parallel(1, 1)
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    return dist.get_rank(), total.item()


@pytest.mark.timeout(120)
def test_port_taken_between_choice_and_listen_is_retried(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        offered = iter([busy.getsockname()[1]])  # the first port offered is already in use
        choose = distributed.free_port
        monkeypatch.setattr(distributed, "free_port", lambda: next(offered, None) or choose())
        assert distributed.run_distributed(_rank, 2) == [(0, 1.0), (1, 1.0)]
