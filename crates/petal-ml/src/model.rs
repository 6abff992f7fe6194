//! Declarative networks (`--model FILE`): a TOML list of layers with
//! PyTorch's names, built on Petal's engine; `tools/torch_from_spec.py`
//! builds the identical `torch.nn.Module` (same parameter names and
//! layouts) from the same file.
//!
//! ```toml
//! [[layer]]
//! type = "conv2d"       # kernel, padding (stride 1)
//! name = "conv1"        # parameters conv1.weight, conv1.bias
//! out = 6
//! kernel = 5
//! [[layer]]
//! type = "relu"         # after conv2d or linear
//! [[layer]]
//! type = "max_pool2d"   # 2×2, stride 2 (also avg_pool2d; and
//!                       # adaptive_avg_pool2d with out = 1: global average)
//! [[layer]]
//! type = "flatten"
//! [[layer]]
//! type = "linear"
//! name = "fc"
//! out = "classes"       # or a number
//! ```
//!
//! Layers the engine has not got yet (batch norm, dropout, residual blocks,
//! strided convolutions) are refused with the layer they are at.

use std::path::Path;

use petal_nn::{LayerSpec, NetSpec};
use serde::Deserialize;

use crate::MlError;

/// A network file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// The layers, first to last.
    pub layer: Vec<LayerFile>,
}

/// An output size: a number, or `"classes"` (the data set's).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Out {
    Count(usize),
    Named(String),
}

/// One layer as written (PyTorch's names and parameters).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerFile {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: Option<String>,
    pub out: Option<Out>,
    pub kernel: Option<usize>,
    #[serde(default)]
    pub padding: usize,
    #[serde(default = "one")]
    pub stride: usize,
}

fn one() -> usize {
    1
}

/// Layer types a network file may name that the engine does not run yet.
const NOT_YET: &[&str] = &["batchnorm1d", "batchnorm2d", "dropout", "residual"];

/// The layer types the engine runs.
const KNOWN: &str = "conv2d, max_pool2d, avg_pool2d, adaptive_avg_pool2d, relu, flatten, linear";

impl ModelFile {
    /// Reads and checks `path` (TOML).
    pub fn load(path: &Path) -> Result<ModelFile, MlError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| MlError::Model(format!("{}: {e}", path.display())))?;
        let m: ModelFile = toml::from_str(&text)
            .map_err(|e| MlError::Model(format!("{}: {e}", path.display())))?;
        m.spec([1, 28, 28], 10)
            .map(|_| ())
            .or_else(|e| match e {
                // Sizes depend on the data; only the structure is checked here.
                MlError::Shape(_) => Ok(()),
                other => Err(other),
            })
            .map_err(|e| MlError::Model(format!("{}: {e}", path.display())))?;
        Ok(m)
    }

    /// The engine's network for inputs of `input` shape and `classes` classes.
    pub fn spec(&self, input: [usize; 3], classes: usize) -> Result<NetSpec, MlError> {
        let bad = |i: usize, why: String| MlError::Model(format!("layer {}: {why}", i + 1));
        let mut layers: Vec<LayerSpec> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let [mut c, mut h, mut w] = input;
        for (i, l) in self.layer.iter().enumerate() {
            let named = |names: &mut Vec<String>| -> Result<String, MlError> {
                let n = l
                    .name
                    .clone()
                    .ok_or_else(|| bad(i, format!("a {} needs a name", l.kind)))?;
                if n.is_empty() || n.contains(|ch: char| !(ch.is_alphanumeric() || ch == '_')) {
                    return Err(bad(i, format!("'{n}' is not a PyTorch module name")));
                }
                if names.contains(&n) {
                    return Err(bad(i, format!("the name '{n}' is used twice")));
                }
                names.push(n.clone());
                Ok(n)
            };
            let out = |l: &LayerFile| -> Result<usize, MlError> {
                match &l.out {
                    Some(Out::Count(n)) if *n > 0 => Ok(*n),
                    Some(Out::Named(s)) if s == "classes" => Ok(classes),
                    Some(other) => Err(bad(
                        i,
                        format!("out = {other:?}: a positive number or \"classes\""),
                    )),
                    None => Err(bad(i, format!("a {} needs out", l.kind))),
                }
            };
            match l.kind.as_str() {
                "conv2d" => {
                    if l.stride != 1 {
                        return Err(bad(
                            i,
                            format!(
                                "stride {} (Petal's engine has stride 1 only, for now)",
                                l.stride
                            ),
                        ));
                    }
                    let k = l
                        .kernel
                        .filter(|&k| k > 0)
                        .ok_or_else(|| bad(i, "conv2d needs kernel".into()))?;
                    let name = named(&mut names)?;
                    let o = out(l)?;
                    if l.padding >= k {
                        return Err(bad(
                            i,
                            format!("padding {} must be smaller than kernel {k}", l.padding),
                        ));
                    }
                    let (hh, ww) = (h + 2 * l.padding, w + 2 * l.padding);
                    if hh < k || ww < k {
                        return Err(MlError::Shape(format!(
                            "layer {}: a {k}×{k} kernel on {h}×{w} inputs",
                            i + 1
                        )));
                    }
                    layers.push(LayerSpec::Conv {
                        name,
                        out: o,
                        kernel: k,
                        padding: l.padding,
                        relu: false,
                    });
                    (c, h, w) = (o, hh + 1 - k, ww + 1 - k);
                }
                "max_pool2d" | "avg_pool2d" => {
                    if l.kernel.is_some_and(|k| k != 2) || !matches!(l.stride, 1 | 2) {
                        return Err(bad(i, format!("{} is 2×2 with stride 2 (for now)", l.kind)));
                    }
                    if h < 2 || w < 2 {
                        return Err(MlError::Shape(format!(
                            "layer {}: pooling {h}×{w} inputs",
                            i + 1
                        )));
                    }
                    layers.push(if l.kind == "max_pool2d" {
                        LayerSpec::MaxPool2
                    } else {
                        LayerSpec::AvgPool2
                    });
                    (h, w) = (h / 2, w / 2);
                }
                "adaptive_avg_pool2d" => {
                    if !matches!(l.out, Some(Out::Count(1))) {
                        return Err(bad(
                            i,
                            "adaptive_avg_pool2d needs out = 1 (to 1×1, for now)".into(),
                        ));
                    }
                    layers.push(LayerSpec::GlobalAvgPool);
                    (h, w) = (1, 1);
                }
                "relu" => match layers.last_mut() {
                    Some(LayerSpec::Conv { relu, .. } | LayerSpec::Linear { relu, .. })
                        if !*relu =>
                    {
                        *relu = true
                    }
                    _ => {
                        return Err(bad(
                            i,
                            "relu follows a conv2d or a linear layer (Petal fuses them)".into(),
                        ));
                    }
                },
                "flatten" => {}
                "linear" => {
                    let name = named(&mut names)?;
                    let o = out(l)?;
                    layers.push(LayerSpec::Linear {
                        name,
                        out: o,
                        relu: false,
                    });
                    (c, h, w) = (o, 1, 1);
                }
                k if NOT_YET.contains(&k) => {
                    return Err(bad(
                        i,
                        format!("{k} is not in Petal's engine yet (it has {KNOWN})"),
                    ));
                }
                k => return Err(bad(i, format!("unknown layer type '{k}' ({KNOWN})"))),
            }
        }
        match layers.last() {
            Some(LayerSpec::Linear {
                out, relu: false, ..
            }) if *out == classes => {}
            _ => {
                return Err(MlError::Model(format!(
                    "the last layer must be a linear layer of out = \"classes\" ({classes}) without relu: its outputs are the logits"
                )));
            }
        }
        let _ = (c, h, w);
        Ok(NetSpec { input, layers })
    }

    /// Parameter names in order (`name.weight`, `name.bias` per layer).
    pub fn parameter_names(&self) -> Vec<String> {
        self.layer
            .iter()
            .filter(|l| matches!(l.kind.as_str(), "conv2d" | "linear"))
            .filter_map(|l| l.name.as_ref())
            .flat_map(|n| [format!("{n}.weight"), format!("{n}.bias")])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/models")
            .join(name)
    }

    #[test]
    fn the_seed_cnn_file_is_the_built_in_cnn() {
        let m = ModelFile::load(&examples("seed-cnn.toml")).unwrap();
        assert_eq!(
            m.spec([3, 32, 32], 10).unwrap(),
            NetSpec::seed_cnn([3, 32, 32], 10)
        );
        assert_eq!(m.parameter_names(), crate::CNN_PARAMETER_NAMES);
        let mlp = ModelFile::load(&examples("mlp.toml")).unwrap();
        let spec = mlp.spec([64, 1, 1], 3).unwrap();
        assert_eq!(spec.layers.len(), 3);
        let allconv = ModelFile::load(&examples("allconv.toml")).unwrap();
        let spec = allconv.spec([3, 32, 32], 10).unwrap();
        assert!(spec.layers.contains(&LayerSpec::GlobalAvgPool));
        assert_eq!(
            spec.layers
                .iter()
                .filter(|l| **l == LayerSpec::AvgPool2)
                .count(),
            2
        );
    }

    #[test]
    fn bad_files_name_the_layer() {
        let cases = [
            ("[[layer]]\ntype = \"relu\"", "layer 1: relu follows"),
            (
                "[[layer]]\ntype = \"linear\"\nout = 3",
                "layer 1: a linear needs a name",
            ),
            (
                "[[layer]]\ntype = \"batchnorm2d\"",
                "layer 1: batchnorm2d is not in Petal's engine yet",
            ),
            (
                "[[layer]]\ntype = \"conv3d\"",
                "unknown layer type 'conv3d'",
            ),
            (
                "[[layer]]\ntype = \"linear\"\nname = \"a\"\nout = 5",
                "the last layer must be a linear layer",
            ),
            (
                "[[layer]]\ntype = \"linear\"\nname = \"a\"\nout = \"classes\"\nsize = 3",
                "unknown field",
            ),
            (
                "[[layer]]\ntype = \"conv2d\"\nname = \"c\"\nout = 4\nkernel = 3\nstride = 2",
                "stride 2",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (text, want) in cases {
            let p = dir.path().join("m.toml");
            std::fs::write(&p, text).unwrap();
            let e = ModelFile::load(&p).unwrap_err().to_string();
            assert!(e.contains("m.toml") && e.contains(want), "{want}: {e}");
        }
        let m: ModelFile = toml::from_str(
            "[[layer]]\ntype = \"conv2d\"\nname = \"c\"\nout = 4\nkernel = 9\n[[layer]]\ntype = \"linear\"\nname = \"f\"\nout = \"classes\"",
        )
        .unwrap();
        assert!(
            m.spec([1, 8, 8], 10)
                .unwrap_err()
                .to_string()
                .contains("9×9 kernel on 8×8")
        );
    }
}
