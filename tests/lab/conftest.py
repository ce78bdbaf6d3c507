"""Fixtures for the NAT lab (``tests/lab``).

Every test here needs root and ``ip``/``nft``/``conntrack``/``tc``; without them each test is
*skipped* with the reason (never silently passed).  Labs built through the fixtures are always
torn down, and at the end of the session no namespace of this run may remain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.lab import netlab
from tests.lab.netlab import Lab, LabSpec, NatType, pair_spec

LabFactory = Callable[[LabSpec], Lab]


@pytest.fixture(scope="session", autouse=True)
def lab_requirements() -> Iterator[None]:
    """Skip (with the reason) when the lab cannot run; afterwards check nothing is left."""
    reason = netlab.missing_requirements()
    if reason is not None:
        pytest.skip(reason)
    yield
    leftovers = [ns for ns in netlab.list_namespaces() if ns.startswith(netlab.RUN_PREFIX)]
    if leftovers:
        netlab.cleanup_prefix(netlab.RUN_PREFIX)
    assert not leftovers, f"lab namespaces left behind by this run: {leftovers}"


def _factory() -> tuple[LabFactory, Callable[[], None]]:
    labs: list[Lab] = []

    def make(spec: LabSpec) -> Lab:
        lab = Lab(spec)
        labs.append(lab)
        return lab.build()

    def close_all() -> None:
        errors: list[Exception] = []
        for lab in reversed(labs):
            try:
                lab.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    return make, close_all


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """``lab = lab_factory(spec)`` builds a lab that is torn down when the test ends."""
    make, close_all = _factory()
    try:
        yield make
    finally:
        close_all()


@pytest.fixture(scope="module")
def module_lab_factory() -> Iterator[LabFactory]:
    """Like :func:`lab_factory`, but the labs live until the end of the test module."""
    make, close_all = _factory()
    try:
        yield make
    finally:
        close_all()


@pytest.fixture
def nat_pair_lab(request: pytest.FixtureRequest, lab_factory: LabFactory) -> Lab:
    """A :func:`~tests.lab.netlab.pair_spec` lab: peers ``a`` and ``b`` and public ``pub``.

    Parametrize indirectly with the two NAT types (default: both port-restricted)::

        @pytest.mark.parametrize("nat_pair_lab", [("full-cone", "symmetric")], indirect=True)
        def test_x(nat_pair_lab: Lab) -> None: ...
    """
    nats: tuple[NatType, NatType] = getattr(
        request, "param", ("port-restricted", "port-restricted")
    )
    return lab_factory(pair_spec(*nats))
