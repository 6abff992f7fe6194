//! The compute kernels, generic over [`Simd`] and compiled once per
//! instruction set. Activations are stored batch-innermost:
//! `[channel][row][column][lane]`, one lane per image, so every layer is a
//! broadcast weight times a vector of images (a fused multiply-add over
//! `LANES` images at once) and no kernel needs a horizontal reduction in its
//! inner loop.
//!
//! Two kernels do nearly all the work:
//! - [`conv_fwd`]: `y[co][oy][ox] = b[co] + Σ w[co][ci][ky][kx] · x[ci][oy+ky-pad][ox+kx-pad]`,
//!   register-blocked over output channels × output positions. Linear
//!   layers, the input gradient of convolutions and the weight gradient of
//!   linear layers are all this kernel on suitably arranged operands.
//! - [`conv_dw`]: the weight gradient of a convolution, a sliding window
//!   over each input row, accumulated per lane and summed once at the end.
//!
//! Every function takes a [`Geom`] that the caller has validated against
//! the slices ([`Geom::check`]); the kernels then index without bounds
//! checks.

use crate::simd::{Isa, Portable, Simd};

/// The shape of one convolution (stride 1) over `lanes`-wide positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub pad: usize,
    /// Floats per position: the batch lanes (a multiple of the vector width).
    pub lanes: usize,
}

impl Geom {
    pub fn oh(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }
    pub fn ow(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }
    pub fn x_len(&self) -> usize {
        self.cin * self.h * self.w * self.lanes
    }
    pub fn y_len(&self) -> usize {
        self.cout * self.oh() * self.ow() * self.lanes
    }
    pub fn w_len(&self) -> usize {
        self.cin * self.k * self.k * self.cout
    }

    /// Panics unless the slices hold exactly this geometry (a programming
    /// error, never data-dependent: shapes are fixed when a network is built).
    pub fn check(&self, isa: Isa, x: usize, w: usize, y: usize) {
        assert!(self.k >= 1 && self.k <= self.h + 2 * self.pad && self.k <= self.w + 2 * self.pad);
        assert!(self.pad < self.k, "padding must be smaller than the kernel");
        assert!(self.lanes > 0 && self.lanes.is_multiple_of(isa.lanes()));
        assert_eq!(x, self.x_len(), "input length");
        assert_eq!(w, self.w_len(), "weight length");
        assert_eq!(y, self.y_len(), "output length");
    }
}

/// The output channels handled together and the output positions handled
/// together: as many accumulators as the registers allow.
fn plan(isa: Isa, cout: usize) -> (usize, usize) {
    let budget = isa.registers() - 4;
    let np = 4;
    let cb = [8, 6, 4, 3, 2, 1]
        .into_iter()
        .find(|&cb| cb * np <= budget && cb <= cout)
        .unwrap_or(1);
    (cb, np)
}

/// Output positions `ox` whose whole kernel window lies inside the input.
fn interior(g: &Geom) -> std::ops::Range<usize> {
    let lo = g.pad;
    let hi = (g.w + g.pad + 1).saturating_sub(g.k).max(lo);
    lo..hi.min(g.ow())
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tile<S: Simd, const CB: usize, const NP: usize>(
    x: *const f32,
    wt: *const f32,
    bias: *const f32,
    y: *mut f32,
    g: &Geom,
    pos: (usize, usize, usize, usize),
    kx: (usize, usize),
    relu: bool,
) {
    let (co0, oy, ox0, v) = pos;
    let (oh, ow) = (g.oh(), g.ow());
    // SAFETY (whole body): `Geom::check` bounds every index below.
    unsafe {
        let mut acc = [[S::zero(); NP]; CB];
        if !bias.is_null() {
            for (c, row) in acc.iter_mut().enumerate() {
                *row = [S::splat(*bias.add(co0 + c)); NP];
            }
        }
        let ky_lo = g.pad.saturating_sub(oy);
        let ky_hi = g.k.min(g.h + g.pad - oy);
        for ci in 0..g.cin {
            for ky in ky_lo..ky_hi {
                let iy = oy + ky - g.pad;
                let xrow = x.add((ci * g.h + iy) * g.w * g.lanes + v);
                let wrow = wt.add((ci * g.k + ky) * g.k * g.cout + co0);
                for kxi in kx.0..kx.1 {
                    let ix0 = ox0 + kxi - g.pad;
                    let mut xs = [S::zero(); NP];
                    for (p, xv) in xs.iter_mut().enumerate() {
                        *xv = S::load(xrow.add((ix0 + p) * g.lanes));
                    }
                    let wk = wrow.add(kxi * g.cout);
                    for (c, row) in acc.iter_mut().enumerate() {
                        let wv = S::splat(*wk.add(c));
                        for (a, xv) in row.iter_mut().zip(xs) {
                            *a = S::fma(wv, xv, *a);
                        }
                    }
                }
            }
        }
        let zero = S::zero();
        for (c, row) in acc.iter().enumerate() {
            let out = y.add(((co0 + c) * oh + oy) * ow * g.lanes + v);
            for (p, &a) in row.iter().enumerate() {
                let a = if relu { S::max(a, zero) } else { a };
                S::store(out.add((ox0 + p) * g.lanes), a);
            }
        }
    }
}

macro_rules! tile_dispatch {
    ($S:ty, $cb:expr, $np:expr, $($args:expr),*) => {
        match ($cb, $np) {
            (8, 4) => conv_tile::<$S, 8, 4>($($args),*),
            (8, 3) => conv_tile::<$S, 8, 3>($($args),*),
            (8, 2) => conv_tile::<$S, 8, 2>($($args),*),
            (8, _) => conv_tile::<$S, 8, 1>($($args),*),
            (6, 4) => conv_tile::<$S, 6, 4>($($args),*),
            (6, 3) => conv_tile::<$S, 6, 3>($($args),*),
            (6, 2) => conv_tile::<$S, 6, 2>($($args),*),
            (6, _) => conv_tile::<$S, 6, 1>($($args),*),
            (4, 4) => conv_tile::<$S, 4, 4>($($args),*),
            (4, 3) => conv_tile::<$S, 4, 3>($($args),*),
            (4, 2) => conv_tile::<$S, 4, 2>($($args),*),
            (4, _) => conv_tile::<$S, 4, 1>($($args),*),
            (3, 4) => conv_tile::<$S, 3, 4>($($args),*),
            (3, 3) => conv_tile::<$S, 3, 3>($($args),*),
            (3, 2) => conv_tile::<$S, 3, 2>($($args),*),
            (3, _) => conv_tile::<$S, 3, 1>($($args),*),
            (2, 4) => conv_tile::<$S, 2, 4>($($args),*),
            (2, 3) => conv_tile::<$S, 2, 3>($($args),*),
            (2, 2) => conv_tile::<$S, 2, 2>($($args),*),
            (2, _) => conv_tile::<$S, 2, 1>($($args),*),
            (_, 4) => conv_tile::<$S, 1, 4>($($args),*),
            (_, 3) => conv_tile::<$S, 1, 3>($($args),*),
            (_, 2) => conv_tile::<$S, 1, 2>($($args),*),
            (_, _) => conv_tile::<$S, 1, 1>($($args),*),
        }
    };
}

/// `y = conv(x, w) + bias`, ReLU when asked. `wt` is `[cin][k][k][cout]`.
#[inline(always)]
unsafe fn conv_fwd<S: Simd>(
    isa: Isa,
    g: &Geom,
    x: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    relu: bool,
) {
    let (cb_max, np_max) = plan(isa, g.cout);
    let inner = interior(g);
    let b = bias.map_or(std::ptr::null(), |b| b.as_ptr());
    let (xp, wp, yp) = (x.as_ptr(), wt.as_ptr(), y.as_mut_ptr());
    let ow = g.ow();
    for v in (0..g.lanes).step_by(S::LANES) {
        for oy in 0..g.oh() {
            let mut ox = 0;
            while ox < ow {
                // Whole windows take up to `np_max` positions at once; a
                // position on the border takes one, with its window clipped.
                let (np, kx) = if inner.contains(&ox) {
                    (np_max.min(inner.end - ox), (0, g.k))
                } else {
                    let lo = g.pad.saturating_sub(ox);
                    (1, (lo, g.k.min(g.w + g.pad - ox)))
                };
                let mut co0 = 0;
                while co0 < g.cout {
                    let cb = [8, 6, 4, 3, 2, 1]
                        .into_iter()
                        .find(|&c| c <= cb_max && c <= g.cout - co0)
                        .unwrap_or(1);
                    // SAFETY: `g` was checked against the slices.
                    unsafe {
                        tile_dispatch!(S, cb, np, xp, wp, b, yp, g, (co0, oy, ox, v), kx, relu);
                    }
                    co0 += cb;
                }
                ox += np;
            }
        }
    }
}

/// The input at column `ix` of a row, or zero outside it (padding).
#[inline(always)]
unsafe fn load_or_zero<S: Simd>(row: *const f32, ix: isize, g: &Geom) -> S::V {
    // SAFETY: a column inside the row is inside the checked input.
    unsafe {
        if ix >= 0 && (ix as usize) < g.w {
            S::load(row.add(ix as usize * g.lanes))
        } else {
            S::zero()
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_rows<S: Simd, const CB: usize, const K: usize>(
    x: *const f32,
    dy: *const f32,
    dw: *mut f32,
    g: &Geom,
    co0: usize,
    ci: usize,
    ky: usize,
    v: usize,
) {
    let (oh, ow) = (g.oh(), g.ow());
    let plane = oh * ow * g.lanes;
    // SAFETY (whole body): `Geom::check` bounds every index below.
    unsafe {
        let mut acc = [[S::zero(); K]; CB];
        let oy_lo = g.pad.saturating_sub(ky);
        let oy_hi = oh.min(g.h + g.pad - ky);
        for oy in oy_lo..oy_hi {
            let iy = oy + ky - g.pad;
            let xrow = x.add((ci * g.h + iy) * g.w * g.lanes + v);
            let dyrow = dy.add((co0 * oh + oy) * ow * g.lanes + v);
            // win[j] holds x at column ox - pad + j.
            let mut win = [S::zero(); K];
            for (j, wv) in win.iter_mut().enumerate() {
                *wv = load_or_zero::<S>(xrow, j as isize - 1 - g.pad as isize, g);
            }
            for ox in 0..ow {
                for j in 0..K - 1 {
                    win[j] = win[j + 1];
                }
                win[K - 1] = load_or_zero::<S>(xrow, (ox + K - 1) as isize - g.pad as isize, g);
                for (c, row) in acc.iter_mut().enumerate() {
                    let d = S::load(dyrow.add(c * plane + ox * g.lanes));
                    for (a, &xv) in row.iter_mut().zip(win.iter()) {
                        *a = S::fma(d, xv, *a);
                    }
                }
            }
        }
        for (c, row) in acc.iter().enumerate() {
            let out = dw.add((((co0 + c) * g.cin + ci) * g.k + ky) * g.k);
            for (kx, &a) in row.iter().enumerate() {
                *out.add(kx) += S::hsum(a);
            }
        }
    }
}

macro_rules! dw_dispatch {
    ($S:ty, $cb:expr, $k:expr, $($args:expr),*) => {
        match ($cb, $k) {
            (4, 1) => dw_rows::<$S, 4, 1>($($args),*),
            (4, 2) => dw_rows::<$S, 4, 2>($($args),*),
            (4, 3) => dw_rows::<$S, 4, 3>($($args),*),
            (4, 4) => dw_rows::<$S, 4, 4>($($args),*),
            (4, 5) => dw_rows::<$S, 4, 5>($($args),*),
            (4, 6) => dw_rows::<$S, 4, 6>($($args),*),
            (4, _) => dw_rows::<$S, 4, 7>($($args),*),
            (3, 1) => dw_rows::<$S, 3, 1>($($args),*),
            (3, 2) => dw_rows::<$S, 3, 2>($($args),*),
            (3, 3) => dw_rows::<$S, 3, 3>($($args),*),
            (3, 4) => dw_rows::<$S, 3, 4>($($args),*),
            (3, 5) => dw_rows::<$S, 3, 5>($($args),*),
            (3, 6) => dw_rows::<$S, 3, 6>($($args),*),
            (3, _) => dw_rows::<$S, 3, 7>($($args),*),
            (2, 1) => dw_rows::<$S, 2, 1>($($args),*),
            (2, 2) => dw_rows::<$S, 2, 2>($($args),*),
            (2, 3) => dw_rows::<$S, 2, 3>($($args),*),
            (2, 4) => dw_rows::<$S, 2, 4>($($args),*),
            (2, 5) => dw_rows::<$S, 2, 5>($($args),*),
            (2, 6) => dw_rows::<$S, 2, 6>($($args),*),
            (2, _) => dw_rows::<$S, 2, 7>($($args),*),
            (_, 1) => dw_rows::<$S, 1, 1>($($args),*),
            (_, 2) => dw_rows::<$S, 1, 2>($($args),*),
            (_, 3) => dw_rows::<$S, 1, 3>($($args),*),
            (_, 4) => dw_rows::<$S, 1, 4>($($args),*),
            (_, 5) => dw_rows::<$S, 1, 5>($($args),*),
            (_, 6) => dw_rows::<$S, 1, 6>($($args),*),
            (_, _) => dw_rows::<$S, 1, 7>($($args),*),
        }
    };
}

/// Largest kernel side the weight-gradient kernel handles.
pub(crate) const MAX_KERNEL: usize = 7;

/// `dw[co][ci][ky][kx] += Σ dy[co][oy][ox] · x[ci][oy+ky-pad][ox+kx-pad]`
/// over positions and lanes (`dw` in PyTorch's `[cout][cin][k][k]` layout).
#[inline(always)]
unsafe fn conv_dw<S: Simd>(isa: Isa, g: &Geom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    // Accumulators: cb * k, plus the window (k) and one gradient vector.
    let budget = isa.registers() - 1 - g.k;
    let cb_max = [4, 3, 2, 1]
        .into_iter()
        .find(|&c| c * g.k <= budget)
        .unwrap_or(1);
    let (xp, dyp, dwp) = (x.as_ptr(), dy.as_ptr(), dw.as_mut_ptr());
    for v in (0..g.lanes).step_by(S::LANES) {
        for ci in 0..g.cin {
            for ky in 0..g.k {
                let mut co0 = 0;
                while co0 < g.cout {
                    let cb = cb_max.min(g.cout - co0);
                    // SAFETY: `g` was checked against the slices.
                    unsafe { dw_dispatch!(S, cb, g.k, xp, dyp, dwp, g, co0, ci, ky, v) };
                    co0 += cb;
                }
            }
        }
    }
}

/// `db[c] += Σ dy[c][..]` over positions and lanes.
#[inline(always)]
unsafe fn bias_grad<S: Simd>(channels: usize, plane: usize, dy: &[f32], db: &mut [f32]) {
    for (c, d) in db.iter_mut().enumerate().take(channels) {
        let row = &dy[c * plane..(c + 1) * plane];
        // SAFETY: `plane` is a multiple of the vector width (lanes are).
        unsafe {
            let mut acc = [S::zero(); 4];
            let mut chunks = row.chunks_exact(4 * S::LANES);
            for ch in chunks.by_ref() {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = S::add(*a, S::load(ch.as_ptr().add(j * S::LANES)));
                }
            }
            for ch in chunks.remainder().chunks_exact(S::LANES) {
                acc[0] = S::add(acc[0], S::load(ch.as_ptr()));
            }
            *d += S::hsum(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3])));
        }
    }
}

/// 2×2 max-pooling with stride 2 (odd last rows/columns dropped, as PyTorch).
#[inline(always)]
unsafe fn pool_fwd<S: Simd>(c: usize, h: usize, w: usize, lanes: usize, x: &[f32], y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    assert_eq!(x.len(), c * h * w * lanes);
    assert_eq!(y.len(), c * oh * ow * lanes);
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    // SAFETY: the lengths were checked above.
    unsafe {
        for ch in 0..c {
            for oy in 0..oh {
                let r0 = xp.add((ch * h + 2 * oy) * w * lanes);
                let r1 = r0.add(w * lanes);
                let out = yp.add((ch * oh + oy) * ow * lanes);
                for ox in 0..ow {
                    for v in (0..lanes).step_by(S::LANES) {
                        let o = 2 * ox * lanes + v;
                        let m = S::max(S::load(r0.add(o)), S::load(r0.add(o + lanes)));
                        let m = S::max(m, S::load(r1.add(o)));
                        let m = S::max(m, S::load(r1.add(o + lanes)));
                        S::store(out.add(ox * lanes + v), m);
                    }
                }
            }
        }
    }
}

/// Gradient of 2×2 max-pooling: each output's gradient goes to the first
/// input equal to its maximum (PyTorch's choice), the others get zero. With
/// `relu`, the pooled values are ReLU outputs and a zero maximum passes no
/// gradient (ReLU's gradient, fused).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pool_bwd<S: Simd>(
    c: usize,
    h: usize,
    w: usize,
    lanes: usize,
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    relu: bool,
) {
    let (oh, ow) = (h / 2, w / 2);
    assert_eq!(x.len(), c * h * w * lanes);
    assert_eq!(dx.len(), x.len());
    assert_eq!(y.len(), c * oh * ow * lanes);
    assert_eq!(dy.len(), y.len());
    if h % 2 == 1 || w % 2 == 1 {
        dx.fill(0.0);
    }
    let (xp, yp, dyp, dxp) = (x.as_ptr(), y.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
    // SAFETY: the lengths were checked above.
    unsafe {
        let zero = S::zero();
        for ch in 0..c {
            for oy in 0..oh {
                let base = (ch * h + 2 * oy) * w * lanes;
                let offs = [0, lanes, w * lanes, w * lanes + lanes];
                let pooled = (ch * oh + oy) * ow * lanes;
                for ox in 0..ow {
                    for v in (0..lanes).step_by(S::LANES) {
                        let m = S::load(yp.add(pooled + ox * lanes + v));
                        let mut d = S::load(dyp.add(pooled + ox * lanes + v));
                        if relu {
                            d = S::keep(S::gt(m, zero), d);
                        }
                        let mut taken = S::none();
                        for off in offs {
                            let at = base + 2 * ox * lanes + off + v;
                            let first = S::andnot(taken, S::eq(S::load(xp.add(at)), m));
                            taken = S::or(taken, first);
                            S::store(dxp.add(at), S::keep(first, d));
                        }
                    }
                }
            }
        }
    }
}

/// `d *= (y > 0)`: the gradient through a ReLU whose output is `y`.
#[inline(always)]
unsafe fn relu_bwd<S: Simd>(y: &[f32], d: &mut [f32]) {
    assert_eq!(y.len(), d.len());
    assert!(y.len().is_multiple_of(S::LANES));
    // SAFETY: equal lengths, a multiple of the vector width.
    unsafe {
        let zero = S::zero();
        for i in (0..y.len()).step_by(S::LANES) {
            let m = S::gt(S::load(y.as_ptr().add(i)), zero);
            let dp = d.as_mut_ptr().add(i);
            S::store(dp, S::keep(m, S::load(dp)));
        }
    }
}

macro_rules! isa_kernels {
    ($name:ident, $S:ty, $feature:literal) => {
        mod $name {
            use super::*;

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn conv_fwd(
                isa: Isa,
                g: &Geom,
                x: &[f32],
                wt: &[f32],
                bias: Option<&[f32]>,
                y: &mut [f32],
                relu: bool,
            ) {
                unsafe { super::conv_fwd::<$S>(isa, g, x, wt, bias, y, relu) }
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn conv_dw(
                isa: Isa,
                g: &Geom,
                x: &[f32],
                dy: &[f32],
                dw: &mut [f32],
            ) {
                unsafe { super::conv_dw::<$S>(isa, g, x, dy, dw) }
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn bias_grad(
                channels: usize,
                plane: usize,
                dy: &[f32],
                db: &mut [f32],
            ) {
                unsafe { super::bias_grad::<$S>(channels, plane, dy, db) }
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn pool_fwd(
                c: usize,
                h: usize,
                w: usize,
                lanes: usize,
                x: &[f32],
                y: &mut [f32],
            ) {
                unsafe { super::pool_fwd::<$S>(c, h, w, lanes, x, y) }
            }

            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn pool_bwd(
                c: usize,
                h: usize,
                w: usize,
                lanes: usize,
                x: &[f32],
                y: &[f32],
                dy: &[f32],
                dx: &mut [f32],
                relu: bool,
            ) {
                unsafe { super::pool_bwd::<$S>(c, h, w, lanes, x, y, dy, dx, relu) }
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn relu_bwd(y: &[f32], d: &mut [f32]) {
                unsafe { super::relu_bwd::<$S>(y, d) }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
isa_kernels!(avx512, crate::simd::Avx512, "avx512f");
#[cfg(target_arch = "x86_64")]
isa_kernels!(avx2, crate::simd::Avx2, "avx2,fma");

/// Calls the kernel `$f` compiled for `$isa`.
macro_rules! dispatch {
    ($isa:expr, $f:ident($($arg:expr),*)) => {{
        match $isa {
            // SAFETY: `Isa::detect`/`Isa::available` only return
            // instruction sets this CPU has.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::$f($($arg),*) },
            // SAFETY: plain Rust; the geometry was checked.
            _ => unsafe { $f::<Portable>($($arg),*) },
        }
    }};
}

/// The kernels compiled for one instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
}

impl Kernels {
    /// Kernels for `isa`, which this CPU must support ([`Isa::available`]).
    pub fn new(isa: Isa) -> Kernels {
        assert!(
            Isa::available().contains(&isa),
            "{isa:?} is not available on this CPU"
        );
        Kernels { isa }
    }

    /// The instruction set.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub(crate) fn conv_fwd(
        &self,
        g: &Geom,
        x: &[f32],
        wt: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        relu: bool,
    ) {
        g.check(self.isa, x.len(), wt.len(), y.len());
        if let Some(b) = bias {
            assert_eq!(b.len(), g.cout);
        }
        let isa = self.isa;
        dispatch!(isa, conv_fwd(isa, g, x, wt, bias, y, relu))
    }

    pub(crate) fn conv_dw(&self, g: &Geom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        g.check(self.isa, x.len(), dw.len(), dy.len());
        assert!(g.k <= MAX_KERNEL);
        let isa = self.isa;
        dispatch!(isa, conv_dw(isa, g, x, dy, dw))
    }

    pub(crate) fn bias_grad(&self, channels: usize, plane: usize, dy: &[f32], db: &mut [f32]) {
        assert!(db.len() >= channels && dy.len() == channels * plane);
        assert!(plane.is_multiple_of(self.isa.lanes()));
        dispatch!(self.isa, bias_grad(channels, plane, dy, db))
    }

    pub(crate) fn pool_fwd(
        &self,
        c: usize,
        h: usize,
        w: usize,
        lanes: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        assert!(lanes.is_multiple_of(self.isa.lanes()));
        dispatch!(self.isa, pool_fwd(c, h, w, lanes, x, y))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pool_bwd(
        &self,
        c: usize,
        h: usize,
        w: usize,
        lanes: usize,
        x: &[f32],
        y: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        relu: bool,
    ) {
        assert!(lanes.is_multiple_of(self.isa.lanes()));
        dispatch!(self.isa, pool_bwd(c, h, w, lanes, x, y, dy, dx, relu))
    }

    pub(crate) fn relu_bwd(&self, y: &[f32], d: &mut [f32]) {
        dispatch!(self.isa, relu_bwd(y, d))
    }
}
