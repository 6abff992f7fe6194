//! `--dataset image-folder`: torchvision's `ImageFolder` layout,
//! `DIR/train/<class>/*.png|jpg|jpeg` and `DIR/test/<class>/*`. Classes are
//! the training folders sorted by name (as `ImageFolder` numbers them);
//! images become RGB (as torchvision's loader converts them), pixels scaled
//! to [0, 1] as `ToTensor`. Images of different sizes are refused, naming
//! two that differ, unless a size is given: then every image is resized
//! (bilinear, pixel centres aligned).

use std::path::{Path, PathBuf};

use crate::{DataError, ImageSet, Normalize, Splits, Values, io_err};

/// Largest side accepted, in pixels.
const MAX_SIDE: usize = 8192;

fn corrupt(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// An image as RGB rows: width, height, `3·w·h` bytes.
struct Rgb {
    w: usize,
    h: usize,
    pixels: Vec<u8>,
}

fn decode_png(path: &Path, bytes: &[u8]) -> Result<Rgb, DataError> {
    let bad = |e: png::DecodingError| corrupt(path, format!("not a readable PNG: {e}"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(bad)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| corrupt(path, "image too large"))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    let (w, h) = (info.width as usize, info.height as usize);
    buf.truncate(info.buffer_size());
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(corrupt(path, "a palette PNG that did not expand")),
    };
    Ok(Rgb {
        w,
        h,
        pixels: to_rgb(&buf, channels, w * h),
    })
}

fn decode_jpeg(path: &Path, bytes: &[u8]) -> Result<Rgb, DataError> {
    let bad = |e: jpeg_decoder::Error| corrupt(path, format!("not a readable JPEG: {e}"));
    let mut d = jpeg_decoder::Decoder::new(bytes);
    d.set_max_decoding_buffer_size(256 << 20);
    let raw = d.decode().map_err(bad)?;
    let info = d
        .info()
        .ok_or_else(|| corrupt(path, "a JPEG without a frame"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let pixels = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => to_rgb(&raw, 1, w * h),
        jpeg_decoder::PixelFormat::L16 => {
            let hi: Vec<u8> = raw.chunks_exact(2).map(|p| p[0]).collect();
            to_rgb(&hi, 1, w * h)
        }
        jpeg_decoder::PixelFormat::RGB24 => raw,
        jpeg_decoder::PixelFormat::CMYK32 => raw
            .chunks_exact(4)
            .flat_map(|p| {
                let k = 255 - p[3] as u16;
                [p[0], p[1], p[2]].map(|c| ((255 - c as u16) * k / 255) as u8)
            })
            .collect(),
    };
    if pixels.len() != 3 * w * h {
        return Err(corrupt(path, "a JPEG whose pixels do not fill its size"));
    }
    Ok(Rgb { w, h, pixels })
}

/// Interleaved pixels of `channels` (gray, gray+alpha, RGB, RGBA) → RGB.
fn to_rgb(buf: &[u8], channels: usize, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 * n);
    for p in buf.chunks_exact(channels).take(n) {
        match channels {
            1 | 2 => out.extend_from_slice(&[p[0], p[0], p[0]]),
            _ => out.extend_from_slice(&p[..3]),
        }
    }
    out
}

/// `img` resized to `h × w`, bilinear with pixel centres aligned (as
/// PIL's and torchvision's bilinear resize without antialiasing).
fn resize(img: &Rgb, h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; 3 * h * w];
    let sy = img.h as f32 / h as f32;
    let sx = img.w as f32 / w as f32;
    for y in 0..h {
        let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (img.h - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(img.h - 1);
        for x in 0..w {
            let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (img.w - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(img.w - 1);
            for c in 0..3 {
                let at = |yy: usize, xx: usize| img.pixels[(yy * img.w + xx) * 3 + c] as f32;
                let top = at(y0, x0) * (1.0 - tx) + at(y0, x1) * tx;
                let bottom = at(y1, x0) * (1.0 - tx) + at(y1, x1) * tx;
                out[(y * w + x) * 3 + c] = (top * (1.0 - ty) + bottom * ty).round() as u8;
            }
        }
    }
    out
}

fn is_image(p: &Path) -> Option<bool> {
    let ext = p.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "png" => Some(true),
        "jpg" | "jpeg" => Some(false),
        _ => None,
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// One split: `dir/<class>/<image>` for the given classes.
fn read_split(
    dir: &Path,
    classes: &[String],
    size: Option<[usize; 2]>,
    first: &mut Option<(PathBuf, usize, usize)>,
) -> Result<(Vec<u8>, Vec<u8>), DataError> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for entry in sorted_entries(dir)? {
        if !entry.is_dir() {
            continue;
        }
        let name = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(label) = classes.iter().position(|c| *c == name) else {
            return Err(corrupt(
                &entry,
                format!(
                    "a class the training split does not have ({})",
                    classes.join(", ")
                ),
            ));
        };
        for file in sorted_entries(&entry)? {
            let Some(png) = is_image(&file) else {
                continue;
            };
            let bytes = std::fs::read(&file).map_err(io_err(&file))?;
            let img = if png {
                decode_png(&file, &bytes)?
            } else {
                decode_jpeg(&file, &bytes)?
            };
            if img.w == 0 || img.h == 0 || img.w > MAX_SIDE || img.h > MAX_SIDE {
                return Err(corrupt(&file, format!("{}×{} pixels", img.w, img.h)));
            }
            // Every image takes the given size, else the first image's.
            let (p0, h, w) = first.get_or_insert_with(|| {
                let [h, w] = size.unwrap_or([img.h, img.w]);
                (file.clone(), h, w)
            });
            let (h, w) = (*h, *w);
            let rgb = if (img.h, img.w) == (h, w) {
                img.pixels
            } else if size.is_some() {
                resize(&img, h, w)
            } else {
                return Err(corrupt(
                    &file,
                    format!(
                        "{}×{} pixels (height×width), where {} has {h}×{w}: give --image-size HxW to resize every image",
                        img.h,
                        img.w,
                        p0.display()
                    ),
                ));
            };
            // Interleaved RGB rows → channel-major planes.
            for c in 0..3 {
                pixels.extend(rgb.iter().skip(c).step_by(3));
            }
            labels.push(label as u8);
        }
    }
    if labels.is_empty() {
        return Err(corrupt(
            dir,
            "no .png, .jpg or .jpeg image in any class folder",
        ));
    }
    Ok((pixels, labels))
}

/// `dir/train` and `dir/test` in `ImageFolder`'s layout; `size` (height,
/// width) resizes every image; `normalize` replaces the identity.
pub fn load_image_folder(
    dir: &Path,
    size: Option<[usize; 2]>,
    normalize: Option<&Normalize>,
) -> Result<Splits, DataError> {
    let train_dir = dir.join("train");
    if !train_dir.is_dir() {
        return Err(DataError::Missing {
            what: "train/ (one folder of images per class)".into(),
            looked: dir.display().to_string(),
            hint:
                "; --dataset image-folder reads DIR/train/<class>/*.png|jpg and DIR/test/<class>/*"
                    .into(),
        });
    }
    let classes: Vec<String> = sorted_entries(&train_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if classes.is_empty() || classes.len() > 256 {
        return Err(corrupt(
            &train_dir,
            format!("{} class folders; expected 1 to 256", classes.len()),
        ));
    }
    let mut first = None;
    let (train_px, train_labels) = read_split(&train_dir, &classes, size, &mut first)?;
    let test_dir = dir.join("test");
    if !test_dir.is_dir() {
        return Err(DataError::Missing {
            what: "test/ (one folder of images per class)".into(),
            looked: dir.display().to_string(),
            hint: String::new(),
        });
    }
    let (test_px, test_labels) = read_split(&test_dir, &classes, size, &mut first)?;
    let (h, w) = first.map_or((0, 0), |(_, h, w)| (h, w));
    let normalize = match normalize {
        Some(n) if n.mean.len() == 3 && n.std.len() == 3 => n.clone(),
        Some(n) => {
            return Err(corrupt(
                dir,
                format!(
                    "--normalize gives {} means for 3 (RGB) channels",
                    n.mean.len()
                ),
            ));
        }
        None => Normalize::identity(3),
    };
    let set = |pixels, labels| ImageSet {
        shape: [3, h, w],
        num_classes: classes.len(),
        values: Values::U8(pixels),
        labels,
        normalize: normalize.clone(),
    };
    Ok(Splits {
        train: set(train_px, train_labels),
        test: set(test_px, test_labels),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/image-folder")
    }

    #[test]
    fn the_example_folder_loads_resized_or_refuses_mixed_sizes() {
        let e = load_image_folder(&examples(), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--image-size") && e.contains("16×16"), "{e}");
        let s = load_image_folder(&examples(), Some([8, 8]), None).unwrap();
        assert_eq!(s.train.shape, [3, 8, 8]);
        assert_eq!(s.train.num_classes, 2);
        assert_eq!(s.train.labels.iter().filter(|&&l| l == 0).count(), 4);
        assert!(s.test.len() >= 2);
        // A red square PNG of class "a" stays red: channel 0 bright, 1 and 2 dark.
        let first = s.train.image(0);
        assert!(first[..64].iter().all(|&v| v > 150), "{first:?}");
        assert!(first[64..].iter().all(|&v| v < 100), "{first:?}");
    }

    #[test]
    fn a_broken_image_or_unknown_test_class_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join("train/cat");
        std::fs::create_dir_all(&class).unwrap();
        std::fs::write(class.join("x.png"), b"not a png").unwrap();
        let e = load_image_folder(dir.path(), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.png") && e.contains("not a readable PNG"),
            "{e}"
        );
        std::fs::write(class.join("x.png"), b"").unwrap();
        std::fs::remove_file(class.join("x.png")).unwrap();
        std::fs::copy(examples().join("train/b/python.jpg"), class.join("y.jpg")).unwrap();
        std::fs::create_dir_all(dir.path().join("test/dog")).unwrap();
        let e = load_image_folder(dir.path(), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dog") && e.contains("a class the training split does not have"),
            "{e}"
        );
        let e = load_image_folder(&dir.path().join("nowhere"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("train/"), "{e}");
    }
}
