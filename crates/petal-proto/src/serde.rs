//! Conversions between wire messages and `petal-core` types (Flower's
//! `common/serde.py`).

use bytes::Bytes;
use petal_core::{Config, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, Tensor};
use std::sync::Arc;

use crate::flwr::{self, client_message as cm, scalar, server_message as sm};
use crate::{ProtoError, TENSOR_TYPE_NUMPY, npy};

/// The `.npy` encoding of every tensor of a [`Parameters`], cached in it so
/// that the messages to every client share one copy.
pub struct NpyTensors(pub Vec<Bytes>);

/// The `.npy` bytes of `p`'s tensors, encoded the first time they are asked for.
pub fn npy_tensors(p: &Parameters) -> Arc<NpyTensors> {
    p.encoded(|p| {
        NpyTensors(
            p.tensors
                .iter()
                .map(|t| Bytes::from(npy::encode(t)))
                .collect(),
        )
    })
}

/// Encodes parameters as `.npy` tensors (once per [`Parameters`]; later
/// calls share the bytes).
pub fn parameters_to_proto(p: &Parameters) -> flwr::Parameters {
    flwr::Parameters {
        tensors: npy_tensors(p).0.clone(),
        tensor_type: TENSOR_TYPE_NUMPY.to_string(),
    }
}

/// Decodes `.npy` tensors; an empty parameter list may have an empty tensor_type.
pub fn parameters_from_proto(p: &flwr::Parameters) -> Result<Parameters, ProtoError> {
    if !p.tensors.is_empty() && p.tensor_type != TENSOR_TYPE_NUMPY {
        return Err(ProtoError::TensorType(p.tensor_type.clone()));
    }
    let tensors = p
        .tensors
        .iter()
        .enumerate()
        .map(|(index, bytes)| {
            let a = npy::decode(bytes).map_err(|e| ProtoError::Tensor {
                index,
                source: Box::new(e),
            })?;
            Ok(Tensor::from_data(a.shape, a.data)?)
        })
        .collect::<Result<_, ProtoError>>()?;
    Ok(Parameters::new(tensors))
}

/// Decodes `.npy` tensors that must have `reference`'s layout: the count
/// is checked first and each shape on its header, so nothing is converted
/// (allocated) for a tensor that does not fit the model.
pub fn parameters_from_proto_like(
    p: &flwr::Parameters,
    reference: &Parameters,
) -> Result<Parameters, ProtoError> {
    if p.tensors.len() != reference.tensors.len() {
        return Err(ProtoError::Core(petal_core::CoreError::ShapeMismatch(
            format!(
                "expected {} tensors, got {}",
                reference.tensors.len(),
                p.tensors.len()
            ),
        )));
    }
    if !p.tensors.is_empty() && p.tensor_type != TENSOR_TYPE_NUMPY {
        return Err(ProtoError::TensorType(p.tensor_type.clone()));
    }
    let tensors = p
        .tensors
        .iter()
        .zip(&reference.tensors)
        .enumerate()
        .map(|(index, (bytes, r))| {
            let a =
                npy::decode_expecting(bytes, Some(&r.shape)).map_err(|e| ProtoError::Tensor {
                    index,
                    source: Box::new(e),
                })?;
            Ok(Tensor::from_data(a.shape, a.data)?)
        })
        .collect::<Result<_, ProtoError>>()?;
    Ok(Parameters::new(tensors))
}

/// Converts a core scalar to the wire.
pub fn scalar_to_proto(s: &Scalar) -> flwr::Scalar {
    let v = match s {
        Scalar::Bool(b) => scalar::Scalar::Bool(*b),
        Scalar::I64(i) => scalar::Scalar::Sint64(*i),
        Scalar::U64(u) => scalar::Scalar::Uint64(*u),
        Scalar::Double(d) => scalar::Scalar::Double(*d),
        Scalar::Str(s) => scalar::Scalar::String(s.clone()),
        Scalar::Bytes(b) => scalar::Scalar::Bytes(Bytes::from(b.clone())),
    };
    flwr::Scalar { scalar: Some(v) }
}

fn scalar_from_proto(s: &flwr::Scalar) -> Option<Scalar> {
    Some(match s.scalar.as_ref()? {
        scalar::Scalar::Bool(b) => Scalar::Bool(*b),
        scalar::Scalar::Sint64(i) => Scalar::I64(*i),
        scalar::Scalar::Uint64(u) => Scalar::U64(*u),
        scalar::Scalar::Double(d) => Scalar::Double(*d),
        scalar::Scalar::String(s) => Scalar::Str(s.clone()),
        scalar::Scalar::Bytes(b) => Scalar::Bytes(b.to_vec()),
    })
}

/// Converts a config map to the wire.
pub fn config_to_proto(c: &Config) -> std::collections::HashMap<String, flwr::Scalar> {
    c.iter()
        .map(|(k, v)| (k.clone(), scalar_to_proto(v)))
        .collect()
}

/// Converts a wire config map; entries without a value are dropped.
pub fn config_from_proto(c: &std::collections::HashMap<String, flwr::Scalar>) -> Config {
    c.iter()
        .filter_map(|(k, v)| scalar_from_proto(v).map(|s| (k.clone(), s)))
        .collect()
}

fn examples(n: i64) -> Result<u64, ProtoError> {
    u64::try_from(n).map_err(|_| ProtoError::NegativeExamples(n))
}

/// The wire count of a local result (saturating: no real data set is that large).
fn wire_examples(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Server side: builds the wire fit instruction.
pub fn fit_ins_to_proto(ins: &FitIns) -> sm::FitIns {
    sm::FitIns {
        parameters: Some(parameters_to_proto(&ins.parameters)),
        config: config_to_proto(&ins.config),
    }
}

/// Client side: reads a fit instruction.
pub fn fit_ins_from_proto(ins: &sm::FitIns) -> Result<FitIns, ProtoError> {
    let p = ins
        .parameters
        .as_ref()
        .ok_or(ProtoError::Missing("parameters"))?;
    Ok(FitIns {
        parameters: Arc::new(parameters_from_proto(p)?),
        config: config_from_proto(&ins.config),
    })
}

/// Server side: builds the wire evaluate instruction.
pub fn evaluate_ins_to_proto(ins: &EvaluateIns) -> sm::EvaluateIns {
    sm::EvaluateIns {
        parameters: Some(parameters_to_proto(&ins.parameters)),
        config: config_to_proto(&ins.config),
    }
}

/// Client side: reads an evaluate instruction.
pub fn evaluate_ins_from_proto(ins: &sm::EvaluateIns) -> Result<EvaluateIns, ProtoError> {
    let p = ins
        .parameters
        .as_ref()
        .ok_or(ProtoError::Missing("parameters"))?;
    Ok(EvaluateIns {
        parameters: Arc::new(parameters_from_proto(p)?),
        config: config_from_proto(&ins.config),
    })
}

/// The OK status Flower sends with every successful result.
pub fn ok_status() -> Option<flwr::Status> {
    status(flwr::Code::Ok, "Success")
}

/// A status; any code but OK makes Flower's server count the result as a failure.
pub fn status(code: flwr::Code, message: impl Into<String>) -> Option<flwr::Status> {
    Some(flwr::Status {
        code: code as i32,
        message: message.into(),
    })
}

/// The status code of a client's failure, between Petal processes.
/// Flower's legacy protocol has no code for "the client tried and failed"
/// (only `*_NOT_IMPLEMENTED`, and Flower reads any other code as OK), so a
/// Petal client sends it only to a Petal server, which announces it with
/// the [`PETAL_ERROR_CODES_HEADER`] response header; Flower servers get
/// the `*_NOT_IMPLEMENTED` code of the call, the only failure they know.
pub const CLIENT_ERROR_CODE: i32 = 100;

/// The `Join` response header by which a Petal server says it reads
/// [`CLIENT_ERROR_CODE`].
pub const PETAL_ERROR_CODES_HEADER: &str = "petal-error-codes";

/// A failure with [`CLIENT_ERROR_CODE`].
pub fn client_error(message: impl Into<String>) -> Option<flwr::Status> {
    Some(flwr::Status {
        code: CLIENT_ERROR_CODE,
        message: message.into(),
    })
}

/// The status message when it is not OK (with the code's name, unless it
/// is a plain client failure).
pub fn status_error(status: &Option<flwr::Status>) -> Option<String> {
    match status {
        Some(s) if s.code == CLIENT_ERROR_CODE => Some(s.message.clone()),
        Some(s) if s.code != flwr::Code::Ok as i32 => {
            let code = flwr::Code::try_from(s.code)
                .map(|c| c.as_str_name().to_string())
                .unwrap_or_else(|_| format!("code {}", s.code));
            Some(format!("{code}: {}", s.message))
        }
        _ => None,
    }
}

/// Client side: builds the wire fit result.
pub fn fit_res_to_proto(res: &FitRes) -> cm::FitRes {
    cm::FitRes {
        status: ok_status(),
        parameters: Some(parameters_to_proto(&res.parameters)),
        num_examples: wire_examples(res.num_examples),
        metrics: config_to_proto(&res.metrics),
    }
}

/// Server side: reads a fit result (a non-OK status is an error).
pub fn fit_res_from_proto(res: &cm::FitRes) -> Result<FitRes, ProtoError> {
    fit_res_from_proto_like(res, None)
}

/// Server side: reads a fit result whose model must have `reference`'s
/// layout (checked tensor by tensor before converting, when given).
pub fn fit_res_from_proto_like(
    res: &cm::FitRes,
    reference: Option<&Parameters>,
) -> Result<FitRes, ProtoError> {
    if let Some(e) = status_error(&res.status) {
        return Err(ProtoError::Core(petal_core::CoreError::Invalid(e)));
    }
    let p = res
        .parameters
        .as_ref()
        .ok_or(ProtoError::Missing("parameters"))?;
    let parameters = match reference {
        Some(r) => parameters_from_proto_like(p, r)?,
        None => parameters_from_proto(p)?,
    };
    Ok(FitRes {
        parameters,
        num_examples: examples(res.num_examples)?,
        metrics: config_from_proto(&res.metrics),
    })
}

/// Client side: builds the wire evaluate result.
pub fn evaluate_res_to_proto(res: &EvaluateRes) -> cm::EvaluateRes {
    cm::EvaluateRes {
        status: ok_status(),
        loss: res.loss,
        num_examples: wire_examples(res.num_examples),
        metrics: config_to_proto(&res.metrics),
    }
}

/// Server side: reads an evaluate result (a non-OK status is an error).
pub fn evaluate_res_from_proto(res: &cm::EvaluateRes) -> Result<EvaluateRes, ProtoError> {
    if let Some(e) = status_error(&res.status) {
        return Err(ProtoError::Core(petal_core::CoreError::Invalid(e)));
    }
    Ok(EvaluateRes {
        loss: res.loss,
        num_examples: examples(res.num_examples)?,
        metrics: config_from_proto(&res.metrics),
    })
}

/// Client side: builds the wire get_parameters result.
pub fn get_parameters_res_to_proto(p: &Parameters) -> cm::GetParametersRes {
    cm::GetParametersRes {
        status: ok_status(),
        parameters: Some(parameters_to_proto(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_round_trip() {
        let ins = FitIns {
            parameters: Arc::new(Parameters::new(vec![
                Tensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
            ])),
            config: [
                ("epochs".to_string(), Scalar::I64(2)),
                ("lr".to_string(), Scalar::Double(0.01)),
                ("name".to_string(), Scalar::Str("x".into())),
            ]
            .into(),
        };
        let back = fit_ins_from_proto(&fit_ins_to_proto(&ins)).unwrap();
        assert_eq!(back, ins);
    }

    #[test]
    fn non_ok_status_is_an_error() {
        let res = cm::FitRes {
            status: status(flwr::Code::FitNotImplemented, "worker crashed"),
            parameters: None,
            num_examples: 0,
            metrics: Default::default(),
        };
        let err = fit_res_from_proto(&res).unwrap_err().to_string();
        assert!(err.contains("worker crashed"), "{err}");
    }

    #[test]
    fn layout_is_checked_before_converting() {
        let reference = Parameters::new(vec![
            Tensor::new(vec![2], vec![0.0; 2]).unwrap(),
            Tensor::new(vec![1], vec![0.0]).unwrap(),
        ]);
        let p = |shapes: &[&[usize]]| flwr::Parameters {
            tensors: shapes
                .iter()
                .map(|s| {
                    let n = s.iter().product();
                    npy::encode_f32(s, &vec![1.0; n]).into()
                })
                .collect(),
            tensor_type: TENSOR_TYPE_NUMPY.into(),
        };
        assert!(parameters_from_proto_like(&p(&[&[2], &[1]]), &reference).is_ok());
        let e = parameters_from_proto_like(&p(&[&[2]]), &reference)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected 2 tensors, got 1"), "{e}");
        let e = parameters_from_proto_like(&p(&[&[2], &[3]]), &reference)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor 1") && e.contains("expected shape [1]"),
            "{e}"
        );
    }

    #[test]
    fn bad_tensor_names_its_index() {
        let p = flwr::Parameters {
            tensors: vec![
                npy::encode_f32(&[1], &[1.0]).into(),
                Bytes::from_static(b"junk"),
            ],
            tensor_type: TENSOR_TYPE_NUMPY.into(),
        };
        let err = parameters_from_proto(&p).unwrap_err().to_string();
        assert!(err.starts_with("tensor 1:"), "{err}");
        let p = flwr::Parameters {
            tensors: vec![Bytes::from_static(&[1])],
            tensor_type: "torch".into(),
        };
        assert!(parameters_from_proto(&p).is_err());
    }
}

#[cfg(test)]
mod encoding_tests {
    use super::*;

    #[test]
    fn parameters_are_encoded_once_and_shared() {
        let p = Parameters::new(vec![Tensor::new(vec![3], vec![1.0, 2.0, 3.0]).unwrap()]);
        let a = parameters_to_proto(&p);
        let b = parameters_to_proto(&p);
        assert_eq!(a.tensors[0].as_ptr(), b.tensors[0].as_ptr(), "same buffer");
        assert_eq!(parameters_from_proto(&a).unwrap(), p);
    }
}
