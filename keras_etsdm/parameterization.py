"""What the network predicts: ε, v or x₀, and the exact conversions between them.

A VP state is ``x = α x₀ + σ ε`` (α² + σ² = 1). A network may be trained to predict

* ``"epsilon"``: the noise ε (DDPM; the library default),
* ``"v"``: the velocity ``v = α ε − σ x₀`` (Salimans & Ho 2022),
* ``"x0"``: the clean data x₀.

``DiffusionModel.denoise`` returns the network's NATIVE prediction (``model.prediction_type``);
every consumer that needs ε̂ or x̂₀ (the samplers, classifier-free guidance's linear
combination aside, the PF-ODE and the likelihood) converts here, with the α, σ of the state x —
the TRUE time of x, never the E-TSDM shared label the network was conditioned on.

The conversions use only ``+ − × ÷``, so they work alike on ``keras.ops`` tensors (inside the
compiled sampling loops) and on numpy float64 arrays (the ODE solvers on the host). They are
exact where the parameterisation is identifiable:

* ε:  x₀ = (x − σ p)/α            (undefined at α = 0: ε carries no information on x₀ there)
* v:  ε = σ x + α p,  x₀ = α x − σ p   (no division: exact at α = 0 and at σ = 0)
* x₀: ε = (x − α p)/σ             (undefined at σ = 0, never reached: σ_0 > 0)

Both maps are linear in ``(x, p)`` with coefficients depending on (α, σ) only; the likelihood
uses this to convert divergences (``∇·ε = a D + b ∇·p`` for ``ε = a x + b p``).
"""

PREDICTION_TYPES = ("epsilon", "v", "x0")


def check_prediction_type(prediction_type):
    """Return ``prediction_type`` if known, else raise ``ValueError`` naming the choices."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of "
                         f"{PREDICTION_TYPES} (noise ε, velocity v = α ε − σ x0, or data x0).")
    return prediction_type


def to_eps_and_x0(prediction, prediction_type, x, alpha, sigma):
    """The (ε̂, x̂₀) implied by a network prediction at the state ``x``.

    Args:
        prediction: the network output p, the shape of ``x``.
        prediction_type: "epsilon", "v" or "x0" (what p is).
        x: the noisy state ``x = α x₀ + σ ε``, ``[B, ...]``.
        alpha, sigma: α and σ of the state's TRUE time (scalars or broadcastable to ``x``).
    Returns:
        ``(eps, x0)``, each the shape of ``x``. For "epsilon" ``eps`` IS ``prediction`` (the
        same object) and x̂₀ is ``(x − σ ε̂)/α`` exactly as the samplers always computed it.
    """
    if prediction_type == "epsilon":
        return prediction, (x - sigma * prediction) / alpha
    if prediction_type == "v":
        return sigma * x + alpha * prediction, alpha * x - sigma * prediction
    if prediction_type == "x0":
        return (x - alpha * prediction) / sigma, prediction
    check_prediction_type(prediction_type)  # raises


def from_eps(eps, prediction_type, x, alpha, sigma):
    """The prediction of type ``prediction_type`` that a model with noise prediction ``eps``
    makes at the state ``x`` (inverse of ``to_eps_and_x0``; for tests and closed forms).

    "epsilon": ε; "v": ``α ε − σ x₀`` with ``x₀ = (x − σ ε)/α``, i.e. ``(ε − σ x)/α``;
    "x0": ``(x − σ ε)/α``. All divide by α: a noise prediction does not determine v or x₀ at
    α = 0 (build v / x₀ closed forms from x₀ directly there).
    """
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v":
        # α ε − σ (x − σ ε)/α = (α² ε + σ² ε − σ x)/α = (ε − σ x)/α.
        return (eps - sigma * x) / alpha
    if prediction_type == "x0":
        return (x - sigma * eps) / alpha
    check_prediction_type(prediction_type)  # raises


def from_x0(x0, prediction_type, x, alpha, sigma):
    """The prediction of type ``prediction_type`` for a data prediction ``x0`` at ``x``:
    ε = (x − α x₀)/σ, v = α ε − σ x₀ = (α x − x₀)/σ. Exact at α = 0 (σ = 1 there)."""
    if prediction_type == "x0":
        return x0
    if prediction_type == "epsilon":
        return (x - alpha * x0) / sigma
    if prediction_type == "v":
        # α (x − α x₀)/σ − σ x₀ = (α x − (α² + σ²) x₀)/σ = (α x − x₀)/σ.
        return (alpha * x - x0) / sigma
    check_prediction_type(prediction_type)  # raises
