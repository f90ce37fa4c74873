"""Measurement of labelled sources in torch, batched over windows (CPU and CUDA, same code).

The quantities of :func:`~survey_engine.kernels.measure.measure_sources` as segment reductions
over ragged per-object boxes, with no Python loop over objects (pixel-centre apertures where sep
samples sub-pixels). Method, agreement with sep, batching, CUDA vs CPU: ``docs/kernels.md``.
"""

from __future__ import annotations

import torch

from ..schema import aper_tag
from .measure import MeasureConfig

__all__ = ["measure_batch", "measure_window", "windowed_centroid_batch"]


def _check_inputs(det, det_var, filtered, images, variances, labels):
    for name, t in (("det", det), ("det_var", det_var), ("filtered", filtered)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            msg = f"{name} must be a (B, H, W) tensor, got shape {tuple(getattr(t, 'shape', ()))}"
            raise ValueError(msg)
    shape = tuple(det.shape)
    for name, t in (("det_var", det_var), ("filtered", filtered), ("labels", labels)):
        if tuple(t.shape) != shape:
            msg = f"{name} has shape {tuple(t.shape)}, det has shape {shape}"
            raise ValueError(msg)
    if images.dim() != 4 or tuple(images.shape[:1] + images.shape[2:]) != shape:
        msg = f"images must have shape (B, nb, H, W) with (B, H, W) = {shape}, got {tuple(images.shape)}"
        raise ValueError(msg)
    _check_like_images("variances", variances, images)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        msg = f"labels must be an integer tensor, got dtype {labels.dtype}"
        raise TypeError(msg)
    devs = {t.device for t in (det, det_var, filtered, images, variances, labels)}
    if len(devs) != 1:
        msg = f"all inputs must be on one device, got {sorted(map(str, devs))}"
        raise ValueError(msg)


def _check_like_images(name, t, images):
    if tuple(t.shape) != tuple(images.shape):
        msg = f"{name} has shape {tuple(t.shape)}, images has shape {tuple(images.shape)}"
        raise ValueError(msg)


def _pw(fn, *args):
    """Element-wise ``fn`` on strided copies: no CPU result depends on its position (kernels.md)."""
    return fn(*(torch.stack((t, t), -1)[..., 0] for t in args))


def _segsum(values, index, n):
    """Per-object sums of ``values`` (last axis) by ``index``, in element order."""
    out = values.new_zeros((*values.shape[:-1], n))
    return out.index_add_(values.dim() - 1, index, values)


def _boxes(cy, cx, half, h, w):
    """Clipped boxes of ``half`` around centres, box by box in raster order: obj, y, x, dy, dx."""
    side = 2 * half + 1
    cnt = side * side
    n_el = int(cnt.sum())
    obj = torch.repeat_interleave(torch.arange(len(cy), device=cy.device), cnt, output_size=n_el)
    start = torch.cumsum(cnt, 0) - cnt
    k = torch.arange(n_el, device=cy.device) - start[obj]
    s, hh = side[obj], half[obj]
    dy = torch.div(k, s, rounding_mode="floor") - hh
    dx = k - (dy + hh) * s - hh
    yy, xx = cy[obj] + dy, cx[obj] + dx
    keep = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    return obj[keep], yy[keep], xx[keep], dy[keep], dx[keep]


def windowed_centroid_batch(
    image: torch.Tensor, variance: torch.Tensor, labels: torch.Tensor, win: torch.Tensor,
    own: torch.Tensor, py: torch.Tensor, px: torch.Tensor, u0: torch.Tensor, v0: torch.Tensor,
    sig: torch.Tensor, *, max_iter: int = 16, tol: float = 2e-4,
):  # fmt: skip
    """Gaussian-windowed centroids of every object of a batch (SExtractor's XWIN/YWIN).

    Same iteration, pixel selection (disc of radius ``half − 0.5``, ``half = clip(ceil(4σ) + 2,
    2, 32)``, neighbours excluded) and per-object summation order as
    :func:`survey_engine.kernels.measure.windowed_centroid`.

    Parameters
    ----------
    image, variance : torch.Tensor
        ``(B, H, W)`` detection image and variance (0 where unusable), in the working dtype.
    labels : torch.Tensor
        ``(B, H, W)`` integer per-window labels.
    win, own : torch.Tensor
        Per object: its window and its label in that window.
    py, px : torch.Tensor
        Integer peak pixel per object.
    u0, v0, sig : torch.Tensor
        Starting offsets (x, y) from the peak and window sigma per object.

    Returns
    -------
    u, v, u_err, v_err, failed : torch.Tensor
    """
    n = len(py)
    _, h, w = image.shape
    dt = image.dtype
    half = (torch.ceil(4.0 * sig).to(torch.int64) + 2).clamp(2, 32)
    obj, yy, xx, dy, dx = _boxes(py, px, half, h, w)
    hv = half[obj].to(dt)
    disc = (dy * dy + dx * dx).to(dt) <= (hv - 0.5) ** 2
    obj, yy, xx, dy, dx = obj[disc], yy[disc], xx[disc], dy[disc], dx[disc]
    flat = (win[obj] * h + yy) * w + xx
    lab = labels.reshape(-1)[flat]
    keep = (lab == 0) | (lab == own[obj])
    obj, dy, dx, flat = obj[keep], dy[keep], dx[keep], flat[keep]
    val, var = image.reshape(-1)[flat], variance.reshape(-1)[flat]
    dxf, dyf = dx.to(dt), dy.to(dt)
    u, v = u0.to(dt).clone(), v0.to(dt).clone()
    inv2s2 = 1.0 / (2.0 * sig.to(dt) ** 2)
    r2max = (4.0 * sig.to(dt)) ** 2
    active = torch.ones(n, dtype=torch.bool, device=u.device)
    converged = torch.zeros(n, dtype=torch.bool, device=u.device)
    e_k = inv2s2[obj]
    for _ in range(max_iter):
        ex, ey = dxf - u[obj], dyf - v[obj]
        arg = (ex * ex + ey * ey) * e_k
        wgt = torch.where(arg >= 8.0, 0.0, _pw(torch.exp, -arg)) * val
        s0 = _segsum(wgt, obj, n)
        sx = _segsum(ex * wgt, obj, n)
        sy = _segsum(ey * wgt, obj, n)
        ok = active & (s0 > 0)
        safe0 = torch.where(s0 > 0, s0, 1.0)
        step_u = torch.where(ok, 2.0 * sx / safe0, 0.0)
        step_v = torch.where(ok, 2.0 * sy / safe0, 0.0)
        u, v = u + step_u, v + step_v
        done = ok & (step_u * step_u + step_v * step_v < tol * tol)
        converged |= done
        active &= ok & ~done
        if not bool(active.any()):
            break
    ex, ey = dxf - u[obj], dyf - v[obj]
    r2 = ex * ex + ey * ey
    wn = torch.where(r2 < r2max[obj], _pw(torch.exp, -r2 * inv2s2[obj]), 0.0)
    s0 = _segsum(wn * val, obj, n)
    safe = torch.where(s0 > 0, s0, 1.0)
    u_err = 2.0 * torch.sqrt(_segsum(wn * wn * var * ex * ex, obj, n)) / safe
    v_err = 2.0 * torch.sqrt(_segsum(wn * wn * var * ey * ey, obj, n)) / safe
    failed = ~converged | (s0 <= 0) | (u * u + v * v > (4.0 * sig.to(dt)) ** 2)
    return u, v, u_err, v_err, failed


def _half_light_radius(obj, r, val, norm, n):
    """Radius enclosing half of ``norm``: pixel-centre cumulative profile, interpolated."""
    order = torch.argsort(r, stable=True)
    order = order[torch.argsort(obj[order], stable=True)]
    o, rs, vs = obj[order], r[order], val[order]
    cnt = torch.bincount(o, minlength=n)
    start = torch.cumsum(cnt, 0) - cnt
    # Per-object running sums, each started from zero (a global cumsum minus an offset would
    # depend on the objects before): objects bucketed by the next power of two of their pixel
    # count, one zero-padded (objects, length) cumsum per bucket.
    k = torch.arange(len(o), device=o.device) - start[o]
    bucket = torch.ceil(torch.log2(cnt.clamp(min=1).to(torch.float64))).to(torch.int64)
    cum = torch.zeros_like(vs)
    for bk in torch.unique(bucket[cnt > 0]).tolist():
        member = (bucket == bk) & (cnt > 0)
        row = torch.cumsum(member.to(torch.int64), 0) - 1
        el = member[o]
        mat = vs.new_zeros((int(member.sum()), 1 << bk))
        r_el, k_el = row[o[el]], k[el]
        mat[r_el, k_el] = vs[el]
        cum[el] = mat.cumsum(1)[r_el, k_el]
    target = 0.5 * norm[o]
    reached = cum >= target
    big = len(o)
    idx = torch.arange(big, device=o.device)
    first = torch.full((n,), big, dtype=torch.int64, device=o.device)
    first.scatter_reduce_(0, o[reached], idx[reached], reduce="amin")
    found = first < big
    fi = first.clamp(max=max(big - 1, 0))
    prev_ok = found & (fi > start)
    pi = (fi - 1).clamp(min=0)
    r1, c1, v1 = rs[fi], cum[fi], vs[fi]
    r0 = torch.where(prev_ok, rs[pi], 0.0)
    c0 = c1 - v1
    frac = torch.where(v1 != 0, (target[fi] - c0) / torch.where(v1 != 0, v1, 1.0), 1.0)
    hlr = r0 + frac.clamp(0.0, 1.0) * (r1 - r0)
    return torch.where(found, hlr, torch.nan)


def measure_batch(
    det: torch.Tensor, det_var: torch.Tensor, filtered: torch.Tensor, images: torch.Tensor,
    variances: torch.Tensor, labels: torch.Tensor, cfg: MeasureConfig | None = None, *,
    dtype: torch.dtype = torch.float64, origin: torch.Tensor | None = None,
    masks: torch.Tensor | None = None, usable_bits: int = 0, sat_bit: int = 0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Measure every labelled object of a batch of equally-sized windows.

    Parameters
    ----------
    det, det_var, filtered : torch.Tensor
        ``(B, H, W)`` background-subtracted detection image, its variance (inf or NaN
        where unusable) and the matched-filtered image that weights the moments
        (:func:`~survey_engine.kernels.detect.matched_filter`).
    images, variances : torch.Tensor
        ``(B, nb, H, W)`` band images and variances (variance not finite where unusable).
    labels : torch.Tensor
        ``(B, H, W)`` integer labels, ``1..n_b`` in window ``b`` (0 = no object).
    cfg : MeasureConfig, optional
        Apertures, Kron and window parameters (defaults as the reference).
    dtype : torch.dtype
        Working dtype of the sums: float64 (default, required for agreement with the
        reference to rounding) or float32 (faster on CUDA). Images are rounded to float32
        first, as the reference does.
    origin : torch.Tensor, optional
        ``(B, 2)`` integer mosaic pixel (y0, x0) of each window's first pixel. The
        barycentre is then formed in mosaic coordinates and shifted back by the exact
        integer origin (as the reference does), so every pixel offset the apertures see
        (and hence every result) is the same in any window that holds the object.
    masks : torch.Tensor, optional
        ``(B, nb, H, W)`` integer mask planes; with them the ``masked`` and ``saturated``
        footprint flags are returned.
    usable_bits, sat_bit : int
        Mask bits that make a pixel unusable, and the saturation bit.

    Returns
    -------
    dict of str to torch.Tensor
        Per object (window after window, label order within a window): ``window``,
        ``label``, positions in window pixel coordinates (``x_peak``, ``y_peak``, ``x_iso``,
        ``y_iso``, ``x``, ``y`` — windowed, falling back to isophotal — and errors) and as
        offsets from the peak pixel (``dx_iso``, ``dy_iso``, ``dx``, ``dy``), ``peak``,
        ``area``, ``a``, ``b``, ``theta``, ``e1``, ``e2``, ``kron_radius``, ``kron_aperture``
        (the Kron ellipse's scale in units of a, b), ``half_light_radius``, ``window_sigma``,
        ``window_failed``, ``det_iso_flux(_err)``, ``det_kron_flux(_err)``, ``kron_truncated``
        (sep's ``APER_TRUNC``: the Kron ellipse's pixel box leaves the window); per band,
        ``(n, nb)``: ``iso_flux(_err)``, ``kron_flux(_err)``, ``aper_flux_{r}(_err)``,
        ``kron_masked`` (sep's ``APER_HASMASKED``: an unusable or a neighbour's pixel among
        those sep visits for the Kron ellipse); with ``masks``, ``masked`` / ``saturated`` (a
        footprint pixel carries an unusable / the saturation bit in any band).
    """
    cfg = cfg or MeasureConfig()
    _check_inputs(det, det_var, filtered, images, variances, labels)
    bsz, h, w = det.shape
    nb, dev, dt = images.shape[1], det.device, dtype
    labels = labels.to(torch.int64)

    # --- inputs as the reference sees them ---------------------------------------------------
    det_var = det_var.to(dt)
    det_bad = ~torch.isfinite(det_var)
    d = torch.where(det_bad, 0.0, det.to(torch.float32)).to(dt)
    dvar = torch.where(det_bad, 0.0, det_var)  # isophotal error: variance as given
    dvar32 = dvar.to(torch.float32).to(dt)  # apertures: float32, as sep reads it
    bvar_in = variances.to(dt)
    b_bad = ~torch.isfinite(bvar_in)
    bimg = images.to(torch.float32).to(dt)
    bvar = torch.where(b_bad, 0.0, bvar_in).to(torch.float32).to(dt)

    # --- one global object index -------------------------------------------------------------
    n_per = labels.reshape(bsz, -1).amax(dim=1).clamp(min=0)
    offset = torch.cumsum(n_per, 0) - n_per
    n = int(n_per.sum())
    flat_all = torch.nonzero(labels.reshape(-1) > 0).squeeze(1)  # raster order, window-major
    win_pix = torch.div(flat_all, h * w, rounding_mode="floor")
    local = flat_all - win_pix * (h * w)
    lab_pix = labels.reshape(-1)[flat_all]
    seg = offset[win_pix] + lab_pix - 1
    win = torch.repeat_interleave(torch.arange(bsz, device=dev), n_per, output_size=n)
    own = torch.arange(n, device=dev) - offset[win] + 1

    # --- peaks: brightest pixel, lowest flat index on ties -----------------------------------
    val = d.reshape(-1)[flat_all]
    peak = torch.full((n,), -torch.inf, dtype=dt, device=dev)
    peak.scatter_reduce_(0, seg, val, reduce="amax")
    cand = val == peak[seg]
    big = torch.iinfo(torch.int64).max
    pidx = torch.full((n,), big, dtype=torch.int64, device=dev)
    pidx.scatter_reduce_(0, seg[cand], local[cand], reduce="amin")
    py = torch.div(pidx, w, rounding_mode="floor")
    px = pidx - py * w
    yy = torch.div(local, w, rounding_mode="floor")
    xx = local - yy * w

    # --- footprint sums ----------------------------------------------------------------------
    area = torch.bincount(seg, minlength=n)
    iso = _segsum(val, seg, n)
    iso_var = _segsum(dvar.reshape(-1)[flat_all], seg, n)
    wgt = filtered.to(dt).reshape(-1)[flat_all]
    wsum = _segsum(wgt, seg, n)
    dx, dy = (xx - px[seg]).to(dt), (yy - py[seg]).to(dt)
    safe_w = torch.where(wsum > 0, wsum, 1.0)
    mx, my = _segsum(wgt * dx, seg, n) / safe_w, _segsum(wgt * dy, seg, n) / safe_w
    x2 = _segsum(wgt * dx * dx, seg, n) / safe_w - mx**2
    y2 = _segsum(wgt * dy * dy, seg, n) / safe_w - my**2
    xy = _segsum(wgt * dx * dy, seg, n) / safe_w - mx * my
    singular = x2 * y2 - xy**2 < 1.0 / 144.0
    x2 = torch.where(singular, x2 + 1.0 / 12.0, x2)
    y2 = torch.where(singular, y2 + 1.0 / 12.0, y2)
    vpix = dvar.reshape(-1)[flat_all]
    ex, ey = dx - mx[seg], dy - my[seg]
    x_err = torch.sqrt(_segsum(vpix * ex * ex, seg, n)) / safe_w
    y_err = torch.sqrt(_segsum(vpix * ey * ey, seg, n)) / safe_w
    if origin is None:
        xb, yb = px.to(dt) + mx, py.to(dt) + my
    else:
        org = origin.to(device=dev, dtype=torch.int64)
        oy_o, ox_o = org[win, 0], org[win, 1]
        # Mosaic coordinates first, then the exact integer origin subtracted (see origin).
        xb = ((px + ox_o).to(dt) + mx) - ox_o.to(dt)
        yb = ((py + oy_o).to(dt) + my) - oy_o.to(dt)
    t1 = 0.5 * (x2 + y2)
    t2 = torch.sqrt(0.25 * (x2 - y2) ** 2 + xy**2)
    a = torch.sqrt(torch.clamp(t1 + t2, min=1e-6))
    b = torch.sqrt(torch.clamp(t1 - t2, min=1e-6))
    theta = 0.5 * _pw(torch.atan2, 2.0 * xy, x2 - y2)
    e1, e2 = (x2 - y2) / (x2 + y2), 2.0 * xy / (x2 + y2)

    # --- ellipse coefficients (sep_ellipse_coeffs) -------------------------------------------
    ct, st = _pw(torch.cos, theta), _pw(torch.sin, theta)
    cxx = ct * ct / (a * a) + st * st / (b * b)
    cyy = st * st / (a * a) + ct * ct / (b * b)
    cxy = 2.0 * ct * st * (1.0 / (a * a) - 1.0 / (b * b))
    cyi, cxi = torch.round(yb).to(torch.int64), torch.round(xb).to(torch.int64)
    lab_flat = labels.reshape(-1)

    def band_index(fl):
        """Flat indices into the ``(B, nb, H, W)`` planes of the pixels ``fl``, ``(nb, E)``."""
        wi = torch.div(fl, h * w, rounding_mode="floor")
        pos = fl - wi * (h * w)
        return (wi[None, :] * nb + torch.arange(nb, device=dev)[:, None]) * (h * w) + pos[None, :]

    def gather(radius):
        """Pixels of a box covering a disc of ``radius`` around the barycentre."""
        half = torch.ceil(radius).to(torch.int64) + 1
        o, gy, gx, _, _ = _boxes(cyi, cxi, half, h, w)
        fl = (win[o] * h + gy) * w + gx
        ddx, ddy = gx.to(dt) - xb[o], gy.to(dt) - yb[o]
        lab = lab_flat[fl]
        neighbour = (lab > 0) & (lab != own[o])
        return o, fl, ddx, ddy, neighbour, gy, gx

    def ellipse_r2(o, ddx, ddy):
        return cxx[o] * ddx * ddx + cyy[o] * ddy * ddy + cxy[o] * ddx * ddy

    # --- Kron radius (sep.kron_radius: pixel centres, masked pixels skipped) -----------------
    o, fl, ddx, ddy, nbr, _, _ = gather(cfg.kron_max_radius * a)
    rp2 = ellipse_r2(o, ddx, ddy)
    use = (rp2 <= cfg.kron_max_radius**2) & ~nbr & ~det_bad.reshape(-1)[fl]
    o, rp2, fl = o[use], rp2[use], fl[use]
    pix = d.reshape(-1)[fl]
    r1 = _segsum(torch.sqrt(rp2) * pix, o, n)
    v1 = _segsum(pix, o, n)
    cnt = torch.bincount(o, minlength=n)
    kron = torch.where((cnt > 0) & (r1 > 0) & (v1 > 0), r1 / torch.where(v1 > 0, v1, 1.0), 0.0)
    kron = torch.where(torch.isfinite(kron) & (kron > 0), kron, 0.0)
    rk = torch.clamp(cfg.kron_factor * kron, min=cfg.kron_min)

    # --- Kron ellipse (sep.sum_ellipse, subpix=1 = pixel centres) and half-light radius ------
    rmax = rk * a
    o, fl, ddx, ddy, nbr, gy, gx = gather(rmax)
    rp2 = ellipse_r2(o, ddx, ddy)
    inside = rp2 < (rk * rk)[o]

    def aperture_sums(sel, masked, img, var, oo):
        """sep's aperture sum with its masked-area correction, for (nb?, E) values."""
        good = sel & ~masked
        tv = _segsum(torch.where(good, img, 0.0), oo, n)
        sv = _segsum(torch.where(good, var, 0.0), oo, n)
        tot = _segsum(sel.to(dt), oo, n)
        msk = _segsum((sel & masked).to(dt), oo, n)
        corr = tot / (tot - msk)
        return tv * corr, torch.sqrt(sv * corr)

    det_masked = nbr | det_bad.reshape(-1)[fl]
    kflux, kerr = aperture_sums(inside, det_masked, d.reshape(-1)[fl], dvar32.reshape(-1)[fl], o)
    # The ellipse's pixel box [xmin, xmax) × [ymin, ymax) (sep's boxextent_ellipse, C
    # truncation); sep's APER_TRUNC: the box leaves the window.
    rx = cxx - cxy * cxy / (4.0 * cyy)
    rx = torch.where(rx > 0, rk / torch.sqrt(torch.where(rx > 0, rx, 1.0)), 0.0)
    ry = cyy - cxy * cxy / (4.0 * cxx)
    ry = torch.where(ry > 0, rk / torch.sqrt(torch.where(ry > 0, ry, 1.0)), 0.0)
    xmin, xmax = torch.trunc(xb - rx + 0.5), torch.trunc(xb + rx + 1.4999999)
    ymin, ymax = torch.trunc(yb - ry + 0.5), torch.trunc(yb + ry + 1.4999999)
    kron_trunc = (xmin < 0) | (xmax > w) | (ymin < 0) | (ymax > h)
    # Bands: values (nb, E) gathered at the same pixels.
    bidx = band_index(fl)
    b_masked = nbr[None, :] | b_bad.reshape(-1)[bidx]
    bkf, bke = aperture_sums(
        inside[None, :], b_masked, bimg.reshape(-1)[bidx], bvar.reshape(-1)[bidx], o
    )
    # sep's APER_HASMASKED: an unusable pixel or a neighbour's pixel (sep counts the pixels
    # its segmap excludes as masked) that sep visits: inside the ellipse's pixel box and
    # within its outer oversampling radius r + 0.7072 / b, whether or not it overlaps.
    xg, yg = gx.to(dt), gy.to(dt)
    in_box = (xg >= xmin[o]) & (xg < xmax[o]) & (yg >= ymin[o]) & (yg < ymax[o])
    visited = in_box & (rp2 < ((rk + 0.7072 / b) ** 2)[o])
    kron_masked = _segsum((visited[None, :] & b_masked).to(dt), o, n) > 0
    # Half-light radius in the circle of radius rk·a (sep.flux_radius: unusable pixels masked,
    # neighbours included), normalised by the Kron flux (the isophotal flux if not positive).
    rr = torch.sqrt(ddx * ddx + ddy * ddy)
    sel = (rr < rmax[o]) & ~det_bad.reshape(-1)[fl]
    norm = torch.where(kflux > 0, kflux, torch.clamp(iso, min=1e-30))
    hlr = _half_light_radius(o[sel], rr[sel], d.reshape(-1)[fl[sel]], norm, n)
    hlr = torch.where(torch.isfinite(hlr) & (hlr > 0), hlr, torch.sqrt(a * b))

    # --- circular apertures (pixel centres, neighbours and unusable pixels masked) -----------
    o, fl, ddx, ddy, nbr, _, _ = gather(torch.full_like(a, cfg.max_aperture))
    rr2 = ddx * ddx + ddy * ddy
    bidx = band_index(fl)
    bmask = nbr[None, :] | b_bad.reshape(-1)[bidx]
    bi_v, bv_v = bimg.reshape(-1)[bidx], bvar.reshape(-1)[bidx]

    def footprint_sum(planes):
        per_band = planes.reshape(bsz, nb, -1).transpose(0, 1).reshape(nb, -1)
        return _segsum(per_band[:, flat_all], seg, n)

    out_bands: dict[str, torch.Tensor] = {
        "iso_flux": footprint_sum(bimg).T, "iso_flux_err": torch.sqrt(footprint_sum(bvar)).T,
        "kron_flux": bkf.T, "kron_flux_err": bke.T,
    }  # fmt: skip
    for r in cfg.apertures:
        f, fe = aperture_sums((rr2 < r * r)[None, :], bmask, bi_v, bv_v, o)
        tag = aper_tag(r)
        out_bands[f"aper_flux_{tag}"], out_bands[f"aper_flux_{tag}_err"] = f.T, fe.T

    # --- windowed centroid -------------------------------------------------------------------
    sig = torch.clamp(2.0 * hlr / 2.3548, min=0.5)
    uw, vw, uw_err, vw_err, wfail = windowed_centroid_batch(
        d.reshape(bsz, h, w), dvar32.reshape(bsz, h, w), labels, win, own, py, px, mx, my, sig,
        max_iter=cfg.window_iterations,
    )  # fmt: skip

    out = {
        "window": win, "label": own,
        "x": torch.where(wfail, xb, px.to(dt) + uw), "y": torch.where(wfail, yb, py.to(dt) + vw),
        "x_err": torch.where(wfail, x_err, uw_err), "y_err": torch.where(wfail, y_err, vw_err),
        "x_iso": xb, "y_iso": yb, "x_iso_err": x_err, "y_iso_err": y_err,
        "x_peak": px, "y_peak": py, "peak": peak, "area": area,
        "a": a, "b": b, "theta": theta, "e1": e1, "e2": e2,
        "kron_radius": kron, "half_light_radius": hlr, "window_failed": wfail,
        "det_iso_flux": iso, "det_iso_flux_err": torch.sqrt(iso_var),
        "det_kron_flux": kflux, "det_kron_flux_err": kerr,
        "dx_iso": mx, "dy_iso": my,
        "dx": torch.where(wfail, mx, uw), "dy": torch.where(wfail, my, vw),
        "kron_aperture": rk, "window_sigma": sig, "kron_truncated": kron_trunc,
        "kron_masked": kron_masked.T,
    }  # fmt: skip
    if masks is not None:
        _check_like_images("masks", masks, images)
        mk = masks.to(torch.int64)
        fp_bits = mk[:, 0].reshape(-1)[flat_all]
        for bi in range(1, nb):
            fp_bits = fp_bits | mk[:, bi].reshape(-1)[flat_all]
        out["masked"] = _segsum(((fp_bits & int(usable_bits)) != 0).to(dt), seg, n) > 0
        out["saturated"] = _segsum(((fp_bits & int(sat_bit)) != 0).to(dt), seg, n) > 0
    out.update(out_bands)
    return out


def measure_window(
    det: torch.Tensor, det_var: torch.Tensor, filtered: torch.Tensor, images: torch.Tensor,
    variances: torch.Tensor, labels: torch.Tensor, cfg: MeasureConfig | None = None, **kwargs,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """:func:`measure_batch` for one window: ``(H, W)`` and ``(nb, H, W)`` inputs."""
    planes = (det, det_var, filtered, images, variances, labels)
    return measure_batch(*(t[None] for t in planes), cfg, **kwargs)
