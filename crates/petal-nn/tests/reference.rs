//! The network against a plain f64 reference written from the definitions
//! (itself checked against finite differences): logits, loss and every
//! gradient, for every instruction set this CPU has, several batch sizes,
//! one and two threads, and nets with padding and odd sizes.

use petal_nn::{Images, Isa, LayerSpec, NetSpec, Network};

/// A naive f64 implementation of a `NetSpec`.
struct Reference {
    spec: NetSpec,
    params: Vec<Vec<f64>>,
}

#[derive(Clone)]
struct Act {
    c: usize,
    h: usize,
    w: usize,
    v: Vec<f64>,
}

impl Reference {
    /// Mean loss and, per parameter, its gradient.
    fn loss_and_grads(
        &self,
        images: &[Vec<f64>],
        labels: &[usize],
    ) -> (f64, Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let mut grads: Vec<Vec<f64>> = self.params.iter().map(|p| vec![0.0; p.len()]).collect();
        let mut loss = 0.0;
        let mut logits_all = Vec::new();
        let n = images.len() as f64;
        for (img, &label) in images.iter().zip(labels) {
            let [c, h, w] = self.spec.input;
            let mut acts = vec![Act {
                c,
                h,
                w,
                v: img.clone(),
            }];
            for (li, layer) in self.spec.layers.iter().enumerate() {
                let x = acts.last().unwrap().clone();
                let p = self.param_index(li);
                acts.push(match layer {
                    LayerSpec::Conv {
                        out,
                        kernel: k,
                        padding: pad,
                        relu,
                        ..
                    } => {
                        let (oh, ow) = (x.h + 2 * pad + 1 - k, x.w + 2 * pad + 1 - k);
                        let (wt, b) = (&self.params[p], &self.params[p + 1]);
                        let mut v = vec![0.0; out * oh * ow];
                        for co in 0..*out {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let mut s = b[co];
                                    for ci in 0..x.c {
                                        for ky in 0..*k {
                                            for kx in 0..*k {
                                                let (iy, ix) = (oy + ky, ox + kx);
                                                if iy < *pad
                                                    || ix < *pad
                                                    || iy - pad >= x.h
                                                    || ix - pad >= x.w
                                                {
                                                    continue;
                                                }
                                                s += wt[((co * x.c + ci) * k + ky) * k + kx]
                                                    * x.v[(ci * x.h + iy - pad) * x.w + ix - pad];
                                            }
                                        }
                                    }
                                    v[(co * oh + oy) * ow + ox] =
                                        if *relu { s.max(0.0) } else { s };
                                }
                            }
                        }
                        Act {
                            c: *out,
                            h: oh,
                            w: ow,
                            v,
                        }
                    }
                    LayerSpec::MaxPool2 => {
                        let (oh, ow) = (x.h / 2, x.w / 2);
                        let mut v = vec![0.0; x.c * oh * ow];
                        for ch in 0..x.c {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let mut m = f64::NEG_INFINITY;
                                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                        m = m
                                            .max(x.v[(ch * x.h + 2 * oy + dy) * x.w + 2 * ox + dx]);
                                    }
                                    v[(ch * oh + oy) * ow + ox] = m;
                                }
                            }
                        }
                        Act {
                            c: x.c,
                            h: oh,
                            w: ow,
                            v,
                        }
                    }
                    LayerSpec::AvgPool2 => {
                        let (oh, ow) = (x.h / 2, x.w / 2);
                        let mut v = vec![0.0; x.c * oh * ow];
                        for ch in 0..x.c {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let mut s = 0.0;
                                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                        s += x.v[(ch * x.h + 2 * oy + dy) * x.w + 2 * ox + dx];
                                    }
                                    v[(ch * oh + oy) * ow + ox] = s / 4.0;
                                }
                            }
                        }
                        Act {
                            c: x.c,
                            h: oh,
                            w: ow,
                            v,
                        }
                    }
                    LayerSpec::GlobalAvgPool => {
                        let plane = x.h * x.w;
                        let v = (0..x.c)
                            .map(|ch| {
                                x.v[ch * plane..(ch + 1) * plane].iter().sum::<f64>() / plane as f64
                            })
                            .collect();
                        Act {
                            c: x.c,
                            h: 1,
                            w: 1,
                            v,
                        }
                    }
                    LayerSpec::Linear { out, relu, .. } => {
                        let inp = x.v.len();
                        let (wt, b) = (&self.params[p], &self.params[p + 1]);
                        let v = (0..*out)
                            .map(|o| {
                                let s =
                                    b[o] + (0..inp).map(|i| wt[o * inp + i] * x.v[i]).sum::<f64>();
                                if *relu { s.max(0.0) } else { s }
                            })
                            .collect();
                        Act {
                            c: *out,
                            h: 1,
                            w: 1,
                            v,
                        }
                    }
                });
            }
            let z = &acts.last().unwrap().v;
            logits_all.push(z.clone());
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
            loss += (sum.ln() + max - z[label]) / n;
            // Backward.
            let mut d: Vec<f64> = z
                .iter()
                .enumerate()
                .map(|(c, v)| ((v - max).exp() / sum - f64::from(c == label)) / n)
                .collect();
            for (li, layer) in self.spec.layers.iter().enumerate().rev() {
                let x = &acts[li];
                let y = &acts[li + 1];
                let p = self.param_index(li);
                let relu = matches!(
                    layer,
                    LayerSpec::Conv { relu: true, .. } | LayerSpec::Linear { relu: true, .. }
                );
                if relu {
                    for (g, v) in d.iter_mut().zip(&y.v) {
                        if *v <= 0.0 {
                            *g = 0.0;
                        }
                    }
                }
                let mut dx = vec![0.0; x.v.len()];
                match layer {
                    LayerSpec::Conv {
                        out,
                        kernel: k,
                        padding: pad,
                        ..
                    } => {
                        let (oh, ow) = (y.h, y.w);
                        for co in 0..*out {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let g = d[(co * oh + oy) * ow + ox];
                                    grads[p + 1][co] += g;
                                    for ci in 0..x.c {
                                        for ky in 0..*k {
                                            for kx in 0..*k {
                                                let (iy, ix) = (oy + ky, ox + kx);
                                                if iy < *pad
                                                    || ix < *pad
                                                    || iy - pad >= x.h
                                                    || ix - pad >= x.w
                                                {
                                                    continue;
                                                }
                                                let xi = (ci * x.h + iy - pad) * x.w + ix - pad;
                                                let wi = ((co * x.c + ci) * k + ky) * k + kx;
                                                grads[p][wi] += g * x.v[xi];
                                                dx[xi] += g * self.params[p][wi];
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    LayerSpec::MaxPool2 => {
                        let (oh, ow) = (y.h, y.w);
                        for ch in 0..x.c {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let m = y.v[(ch * oh + oy) * ow + ox];
                                    for (dy, dxx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                        let xi = (ch * x.h + 2 * oy + dy) * x.w + 2 * ox + dxx;
                                        if x.v[xi] == m {
                                            dx[xi] = d[(ch * oh + oy) * ow + ox];
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    LayerSpec::AvgPool2 => {
                        let (oh, ow) = (y.h, y.w);
                        for ch in 0..x.c {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    for (dy, dxx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                        let xi = (ch * x.h + 2 * oy + dy) * x.w + 2 * ox + dxx;
                                        dx[xi] = d[(ch * oh + oy) * ow + ox] / 4.0;
                                    }
                                }
                            }
                        }
                    }
                    LayerSpec::GlobalAvgPool => {
                        let plane = x.h * x.w;
                        for (i, g) in dx.iter_mut().enumerate() {
                            *g = d[i / plane] / plane as f64;
                        }
                    }
                    LayerSpec::Linear { out, .. } => {
                        let inp = x.v.len();
                        for o in 0..*out {
                            grads[p + 1][o] += d[o];
                            for i in 0..inp {
                                grads[p][o * inp + i] += d[o] * x.v[i];
                                dx[i] += d[o] * self.params[p][o * inp + i];
                            }
                        }
                    }
                }
                d = dx;
            }
        }
        (loss, grads, logits_all)
    }

    /// Index of layer `li`'s weight in `params`.
    fn param_index(&self, li: usize) -> usize {
        self.spec.layers[..li]
            .iter()
            .filter(|l| {
                !matches!(
                    l,
                    LayerSpec::MaxPool2 | LayerSpec::AvgPool2 | LayerSpec::GlobalAvgPool
                )
            })
            .count()
            * 2
    }
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 24) as u8
        })
        .collect()
}

struct Case {
    spec: NetSpec,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

fn case(spec: NetSpec, n: usize, seed: u32) -> Case {
    let size: usize = spec.input.iter().product();
    let classes = match spec.layers.last() {
        Some(LayerSpec::Linear { out, .. }) => *out,
        _ => unreachable!(),
    };
    Case {
        pixels: bytes(n * size, seed),
        labels: bytes(n, seed + 7)
            .into_iter()
            .map(|b| b % classes as u8)
            .collect(),
        spec,
    }
}

fn reference_of(net: &Network, c: &Case, batch: &[usize]) -> (f64, Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let size: usize = c.spec.input.iter().product();
    let r = Reference {
        spec: c.spec.clone(),
        params: net
            .params()
            .iter()
            .map(|p| p.data.iter().map(|&v| v as f64).collect())
            .collect(),
    };
    let images: Vec<Vec<f64>> = batch
        .iter()
        .map(|&i| {
            c.pixels[i * size..(i + 1) * size]
                .iter()
                .map(|&p| p as f64 / 127.5 - 1.0)
                .collect()
        })
        .collect();
    let labels: Vec<usize> = batch.iter().map(|&i| c.labels[i] as usize).collect();
    r.loss_and_grads(&images, &labels)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            ((g as f64) - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, want {w} (scale {scale})"
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

fn padded_net() -> NetSpec {
    NetSpec {
        input: [2, 9, 7],
        layers: vec![
            LayerSpec::Conv {
                name: "c1".into(),
                out: 5,
                kernel: 3,
                padding: 1,
                relu: true,
            },
            LayerSpec::MaxPool2,
            LayerSpec::Conv {
                name: "c2".into(),
                out: 9,
                kernel: 2,
                padding: 1,
                relu: false,
            },
            LayerSpec::Linear {
                name: "f1".into(),
                out: 13,
                relu: true,
            },
            LayerSpec::Linear {
                name: "f2".into(),
                out: 3,
                relu: false,
            },
        ],
    }
}

/// Average pooling (odd sizes) and global average pooling before the head.
fn avg_net() -> NetSpec {
    NetSpec {
        input: [2, 11, 9],
        layers: vec![
            LayerSpec::Conv {
                name: "c1".into(),
                out: 5,
                kernel: 3,
                padding: 1,
                relu: true,
            },
            LayerSpec::AvgPool2,
            LayerSpec::Conv {
                name: "c2".into(),
                out: 7,
                kernel: 2,
                padding: 0,
                relu: true,
            },
            LayerSpec::GlobalAvgPool,
            LayerSpec::Linear {
                name: "fc".into(),
                out: 4,
                relu: false,
            },
        ],
    }
}

#[test]
fn the_reference_agrees_with_finite_differences() {
    for spec in [padded_net(), avg_net()] {
        finite_differences(spec);
    }
}

fn finite_differences(spec: NetSpec) {
    let c = case(spec, 3, 5);
    let net = Network::with_isa(&c.spec, 1, Isa::Portable).unwrap();
    let batch = [0, 1, 2];
    let (_, grads, _) = reference_of(&net, &c, &batch);
    let size: usize = c.spec.input.iter().product();
    let base = Reference {
        spec: c.spec.clone(),
        params: net
            .params()
            .iter()
            .map(|p| p.data.iter().map(|&v| v as f64).collect())
            .collect(),
    };
    let images: Vec<Vec<f64>> = batch
        .iter()
        .map(|&i| {
            c.pixels[i * size..(i + 1) * size]
                .iter()
                .map(|&p| p as f64 / 127.5 - 1.0)
                .collect()
        })
        .collect();
    let labels: Vec<usize> = batch.iter().map(|&i| c.labels[i] as usize).collect();
    let eps = 1e-6;
    for (p, g) in grads.iter().enumerate() {
        for i in (0..g.len()).step_by(7) {
            let mut plus = base.params.clone();
            plus[p][i] += eps;
            let mut minus = base.params.clone();
            minus[p][i] -= eps;
            let lp = Reference {
                spec: c.spec.clone(),
                params: plus,
            }
            .loss_and_grads(&images, &labels)
            .0;
            let lm = Reference {
                spec: c.spec.clone(),
                params: minus,
            }
            .loss_and_grads(&images, &labels)
            .0;
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-6 + 1e-4 * g[i].abs(),
                "param {p}[{i}]: analytic {} vs numeric {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn every_isa_matches_the_reference() {
    let specs = [
        (NetSpec::seed_cnn([3, 32, 32], 10), 40),
        (NetSpec::seed_cnn([1, 28, 28], 10), 19),
        (padded_net(), 21),
        (avg_net(), 13),
    ];
    for (spec, n) in specs {
        let c = case(spec, n, 3);
        for isa in Isa::available() {
            for threads in [1, 2] {
                for batch in [vec![0], (0..5).collect(), (0..n).collect::<Vec<_>>()] {
                    let mut net = Network::with_isa(&c.spec, 9, isa).unwrap();
                    net.set_threads(threads);
                    let data = Images::new(c.spec.input, &c.pixels, &c.labels);
                    let (want_loss, want_grads, want_logits) = reference_of(&net, &c, &batch);
                    let what = format!(
                        "{isa:?}, {threads} threads, batch {}, input {:?}",
                        batch.len(),
                        c.spec.input
                    );
                    let logits = net.logits(&data, &batch).unwrap();
                    for (l, (g, w)) in logits.iter().zip(&want_logits).enumerate() {
                        assert_close(&format!("{what}: logits of image {l}"), g, w, 2e-5);
                    }
                    let (loss, grads) = net.gradients(&data, &batch).unwrap();
                    assert!(
                        (loss - want_loss).abs() < 1e-4 * want_loss.max(1.0),
                        "{what}: loss {loss} vs {want_loss}"
                    );
                    for (p, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
                        assert_close(&format!("{what}: {}", net.params()[p].name), g, w, 2e-5);
                    }
                    let (sum, correct) = net.evaluate_batch(&data, &batch).unwrap();
                    assert!(
                        (sum / batch.len() as f64 - want_loss).abs() < 1e-4 * want_loss.max(1.0),
                        "{what}"
                    );
                    assert!(correct <= batch.len());
                }
            }
        }
    }
}

#[test]
fn an_sgd_step_follows_pytorchs_momentum_rule() {
    let c = case(NetSpec::seed_cnn([1, 16, 16], 10), 8, 4);
    let data = Images::new(c.spec.input, &c.pixels, &c.labels);
    let batch: Vec<usize> = (0..8).collect();
    let mut net = Network::with_isa(&c.spec, 2, Isa::Portable).unwrap();
    let p0: Vec<Vec<f32>> = net.params().iter().map(|p| p.data.clone()).collect();
    let (_, g0) = net.gradients(&data, &batch).unwrap();
    net.train_batch(&data, &batch, 0.1, 0.9).unwrap();
    let p1: Vec<Vec<f32>> = net.params().iter().map(|p| p.data.clone()).collect();
    let (_, g1) = net.gradients(&data, &batch).unwrap();
    net.train_batch(&data, &batch, 0.1, 0.9).unwrap();
    for (i, p) in net.params().iter().enumerate() {
        for j in 0..p.data.len() {
            // buf1 = g0; p1 = p0 - lr*buf1; buf2 = 0.9*buf1 + g1; p2 = p1 - lr*buf2.
            assert!((p1[i][j] - (p0[i][j] - 0.1 * g0[i][j])).abs() < 1e-6);
            let want = p1[i][j] - 0.1 * (0.9 * g0[i][j] + g1[i][j]);
            assert!((p.data[j] - want).abs() < 1e-6, "{}[{j}]", p.name);
        }
    }
}

#[test]
fn bad_specs_and_data_are_errors() {
    let bad = NetSpec {
        input: [1, 4, 4],
        layers: vec![LayerSpec::MaxPool2],
    };
    assert!(Network::new(&bad, 0).is_err());
    assert!(Network::new(&NetSpec::seed_cnn([3, 8, 8], 10), 0).is_err());
    let mut net = Network::new(&NetSpec::seed_cnn([1, 16, 16], 10), 0).unwrap();
    let pixels = vec![0u8; 256];
    let data = Images::new([1, 16, 16], &pixels, &[10]);
    assert!(
        net.train_batch(&data, &[0], 0.1, 0.9)
            .unwrap_err()
            .to_string()
            .contains("label 10")
    );
    let data = Images::new([1, 16, 16], &pixels, &[1]);
    assert!(net.train_batch(&data, &[1], 0.1, 0.9).is_err());
    assert!(net.set_params(&[&[0.0]]).is_err());
}
