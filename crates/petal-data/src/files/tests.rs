use super::*;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data")
}

/// A zip archive of `members`, stored uncompressed (as NumPy's `savez`).
fn zip(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in members {
        let offset = out.len() as u32;
        let crc = crc(data);
        let head = |sig: u32, central: bool| {
            let mut h = sig.to_le_bytes().to_vec();
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&20u16.to_le_bytes());
            h.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            if central {
                // Comment length, disk, internal and external attributes.
                h.extend_from_slice(&[0; 10]);
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        out.extend(head(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend(head(0x0201_4b50, true));
    }
    let at = out.len() as u32;
    let n = members.len() as u16;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&at.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn crc(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn npy_u8(shape: &[usize], data: &[u8]) -> Vec<u8> {
    let t = petal_core::Tensor {
        shape: shape.to_vec(),
        data: TensorData::U8(data.to_vec()),
    };
    petal_proto::npy::encode(&t)
}

fn npy(t: TensorData, shape: &[usize]) -> Vec<u8> {
    petal_proto::npy::encode(&petal_core::Tensor {
        shape: shape.to_vec(),
        data: t,
    })
}

#[test]
fn the_example_npz_and_csv_sets_load() {
    let s = load_npz(&examples().join("npz"), None).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (64, 32));
    assert_eq!(s.train.shape, [1, 8, 8]);
    assert_eq!(s.train.num_classes, 4);
    assert!(matches!(s.train.values, Values::U8(_)));
    // ToTensor only: a pixel of 255 is 1.0.
    assert_eq!(s.train.normalize, Normalize::identity(1));
    let v = s.train.normalized(0);
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));

    let c = load_csv(&examples().join("csv"), "species").unwrap();
    assert_eq!(
        (c.train.len(), c.test.len(), c.train.shape),
        (60, 30, [4, 1, 1])
    );
    assert_eq!(c.train.num_classes, 3);
    // Standardised with the training split's statistics.
    let cols: Vec<Vec<f32>> = (0..c.train.len()).map(|i| c.train.normalized(i)).collect();
    for j in 0..4 {
        let mean: f32 = cols.iter().map(|r| r[j]).sum::<f32>() / 60.0;
        let var: f32 = cols.iter().map(|r| (r[j] - mean).powi(2)).sum::<f32>() / 60.0;
        assert!(
            mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
            "feature {j}: {mean} {var}"
        );
    }
}

#[test]
fn float_and_tabular_npz_load_and_normalisation_can_be_given() {
    let dir = tempfile::tempdir().unwrap();
    let x = npy(
        TensorData::F32((0..30).map(|i| i as f32).collect()),
        &[10, 3],
    );
    let y = npy(TensorData::I32((0..10).map(|i| i % 5).collect()), &[10]);
    for f in ["train.npz", "test.npz"] {
        std::fs::write(
            dir.path().join(f),
            zip(&[("x.npy", x.clone()), ("y.npy", y.clone())]),
        )
        .unwrap();
    }
    let n = Normalize {
        mean: vec![1.0, 2.0, 3.0],
        std: vec![2.0, 2.0, 2.0],
    };
    let s = load_npz(dir.path(), Some(&n)).unwrap();
    assert_eq!(s.train.shape, [3, 1, 1]);
    assert_eq!(s.train.num_classes, 5);
    assert_eq!(s.train.normalized(1), vec![1.0, 1.0, 1.0]);
    let e = load_npz(dir.path(), Some(&Normalize::identity(2)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.npz") && e.contains("2 means and 2 stds for 3 channels"),
        "{e}"
    );
}

#[test]
fn malformed_npz_files_are_named_with_the_field_at_fault() {
    type Members = Vec<(&'static str, Vec<u8>)>;
    let cases: Vec<(Members, &str)> = vec![
        (vec![("y.npy", npy_u8(&[2], &[0, 1]))], "no array 'x'"),
        (
            vec![
                ("x.npy", npy_u8(&[2, 4], &[0; 8])),
                ("y.npy", npy_u8(&[3], &[0; 3])),
            ],
            "y has shape [3]; expected [2]",
        ),
        (
            vec![
                ("x.npy", npy_u8(&[2, 2, 2], &[0; 8])),
                ("y.npy", npy_u8(&[2], &[0; 2])),
            ],
            "x has shape [2, 2, 2]; expected N×C×H×W or N×D",
        ),
        (
            vec![
                ("x.npy", npy_u8(&[2, 4], &[0; 8])),
                ("y.npy", npy(TensorData::F32(vec![0.0, 1.0]), &[2])),
            ],
            "y holds floats",
        ),
        (
            vec![
                ("x.npy", npy_u8(&[2, 4], &[0; 8])),
                ("y.npy", npy(TensorData::I64(vec![0, -1]), &[2])),
            ],
            "y[1] is -1, not a class",
        ),
        (
            vec![
                ("x.npy", npy(TensorData::F64(vec![0.0; 8]), &[2, 4])),
                ("y.npy", npy_u8(&[2], &[0; 2])),
            ],
            "x is F64; expected uint8 or float32",
        ),
        (
            vec![
                ("x.npy", npy(TensorData::F32(vec![f32::NAN; 8]), &[2, 4])),
                ("y.npy", npy_u8(&[2], &[0; 2])),
            ],
            "x holds NaN",
        ),
        (vec![("x.npy", b"not npy".to_vec())], "x: "),
    ];
    for (members, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.npz"), zip(&members)).unwrap();
        let e = load_npz(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("train.npz") && e.contains(want), "{want}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let e = load_npz(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("train.npz") && e.contains("not found"), "{e}");
    std::fs::write(dir.path().join("train.npz"), b"PK garbage").unwrap();
    let e = load_npz(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("not a valid .npz (zip) archive"), "{e}");
    let good = zip(&[
        ("x.npy", npy_u8(&[2, 4], &[0; 8])),
        ("y.npy", npy_u8(&[2], &[0, 1])),
    ]);
    std::fs::write(dir.path().join("train.npz"), &good[..good.len() - 30]).unwrap();
    assert!(load_npz(dir.path(), None).is_err(), "a truncated archive");
}

#[test]
fn malformed_csv_files_are_named_with_line_and_column() {
    let cases = [
        ("a,b\n1,2\n", "no column 'label' (columns: a, b)"),
        ("a,label\n1,2\n3\n", "line 3: 1 fields, the header has 2"),
        (
            "a,label\n1,2\nx,1\n",
            "line 3, column 'a': 'x' is not a number",
        ),
        ("a,label\n1,2.5\n", "is 2.5, not a class"),
        ("label\n1\n", "no feature column"),
        ("a,label\n", "no rows after the header"),
        ("a,label\nnan,1\n", "line 2, column 'a': nan"),
    ];
    for (text, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.csv"), text).unwrap();
        std::fs::write(dir.path().join("test.csv"), "a,label\n1,0\n").unwrap();
        let e = load_csv(dir.path(), "label").unwrap_err().to_string();
        assert!(e.contains("train.csv") && e.contains(want), "{want}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train.csv"), "a,b,label\n1,2,0\n").unwrap();
    std::fs::write(dir.path().join("test.csv"), "b,a,label\n1,2,0\n").unwrap();
    let e = load_csv(dir.path(), "label").unwrap_err().to_string();
    assert!(
        e.contains("test.csv") && e.contains("differ from train.csv's"),
        "{e}"
    );
}
