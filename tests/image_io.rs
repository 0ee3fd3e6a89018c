//! Image loading, the trainer's resize/crop/flip helpers, tensor ↔ RGB conversion and PNG
//! writing with text chunks (atomic, with clear errors).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pairstyle::engine::image_io::{
    center_crop_offsets, crop, crop_tensor, decode_rgb, hflip, hflip_tensor, load_image_tensor,
    load_rgb, random_crop_offsets, read_png_text, resize_exact, resize_shorter_side, rgb_to_tensor,
    save_png_with_text, tensor_to_rgb8, write_file_atomic, GenerationMeta, RgbImage,
    DEFAULT_MAX_SIDE,
};
use pairstyle::Error;
use rand::SeedableRng;

fn seeded_rng_(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("image_io-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A deterministic test pattern.
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 37 % 256) as u8,
            (y * 53 % 256) as u8,
            ((x + y) * 11 % 256) as u8,
        ])
    })
}

/// Files in `dir` other than `keep`.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

fn assert_image_error(res: pairstyle::Result<RgbImage>, path: &Path, needle: &str) {
    match res {
        Err(Error::Image { path: p, message }) => {
            assert_eq!(p, path);
            assert!(
                message.to_lowercase().contains(needle),
                "{}: {message}",
                path.display()
            );
            let shown = Error::Image { path: p, message }.to_string();
            assert!(shown.contains(&path.display().to_string()), "{shown}");
        }
        Err(other) => panic!("expected Error::Image for {}, got {other}", path.display()),
        Ok(_) => panic!("expected an error for {}", path.display()),
    }
}

#[test]
fn png_round_trip_with_text_chunks() {
    let dir = scratch_dir("roundtrip");
    let img = pattern(24, 16);
    let meta = GenerationMeta {
        prompt: "a cat in Ukiyo-e style — 猫".into(),
        negative: Some("blurry".into()),
        seed: 1234,
        steps: 30,
        cfg: 7.5,
        scheduler: "euler".into(),
        model: "tiny-sdxl".into(),
        width: 24,
        height: 16,
        extra: [("style_scale".to_string(), serde_json::json!(3.0))]
            .into_iter()
            .collect(),
    };
    let chunks = meta.text_chunks();
    let out = dir.join("out.png");
    save_png_with_text(&out, img.as_raw(), 24, 16, &chunks).unwrap();

    let back = load_rgb(&out, DEFAULT_MAX_SIDE).unwrap();
    assert_eq!(back, img, "pixels survive the round trip");
    let text = read_png_text(&out).unwrap();
    let get = |k: &str| {
        text.iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("chunk {k} missing: {text:?}"))
    };
    assert_eq!(
        get("prompt"),
        meta.prompt,
        "non-ASCII prompt goes through iTXt"
    );
    assert_eq!(get("negative"), "blurry");
    assert_eq!(get("seed"), "1234");
    assert_eq!(get("steps"), "30");
    assert_eq!(get("cfg"), "7.5");
    assert_eq!(get("scheduler"), "euler");
    assert_eq!(get("model"), "tiny-sdxl");
    assert!(get("Software").starts_with("pairstyle "));
    let params: GenerationMeta = serde_json::from_str(&get("parameters")).unwrap();
    assert_eq!(
        params, meta,
        "the JSON parameters chunk holds every setting"
    );
    assert_eq!(
        others(&dir, &["out.png"]),
        Vec::<String>::new(),
        "no temp files left"
    );

    // Overwriting an existing file works and replaces it whole.
    save_png_with_text(&out, pattern(8, 8).as_raw(), 8, 8, &[("k", "v")]).unwrap();
    assert_eq!(
        load_rgb(&out, DEFAULT_MAX_SIDE).unwrap().dimensions(),
        (8, 8)
    );
    assert_eq!(read_png_text(&out).unwrap(), vec![("k".into(), "v".into())]);
}

#[test]
fn bad_files_give_image_errors_naming_the_file() {
    let dir = scratch_dir("bad");
    let good = dir.join("good.png");
    save_png_with_text(&good, pattern(32, 32).as_raw(), 32, 32, &[("a", "b")]).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let missing = dir.join("missing.png");
    assert_image_error(load_rgb(&missing, DEFAULT_MAX_SIDE), &missing, "not found");

    let empty = dir.join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    assert_image_error(load_rgb(&empty, DEFAULT_MAX_SIDE), &empty, "empty");

    let text = dir.join("notes.png");
    std::fs::write(&text, b"this is not an image at all\n").unwrap();
    assert_image_error(load_rgb(&text, DEFAULT_MAX_SIDE), &text, "not an image");

    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_image_error(load_rgb(&truncated, DEFAULT_MAX_SIDE), &truncated, "decode");

    let header_only = dir.join("header.png");
    std::fs::write(&header_only, &bytes[..8]).unwrap();
    assert_image_error(
        load_rgb(&header_only, DEFAULT_MAX_SIDE),
        &header_only,
        "decode",
    );

    let corrupt = dir.join("corrupt.png");
    let mut c = bytes.clone();
    // Flip bytes inside the IDAT payload (its CRC no longer matches).
    let idat = c.windows(4).position(|w| w == b"IDAT").unwrap();
    for b in &mut c[idat + 8..idat + 40] {
        *b ^= 0x5a;
    }
    std::fs::write(&corrupt, &c).unwrap();
    assert_image_error(load_rgb(&corrupt, DEFAULT_MAX_SIDE), &corrupt, "decode");

    // A JPEG cut short is refused too.
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(pattern(64, 64))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let jpath = dir.join("photo.jpg");
    std::fs::write(&jpath, &jpeg).unwrap();
    assert_eq!(
        load_rgb(&jpath, DEFAULT_MAX_SIDE).unwrap().dimensions(),
        (64, 64)
    );
    let jcut = dir.join("cut.jpg");
    std::fs::write(&jcut, &jpeg[..jpeg.len() / 3]).unwrap();
    assert_image_error(load_rgb(&jcut, DEFAULT_MAX_SIDE), &jcut, "decode");

    // And a WebP cut short.
    let mut webp = Vec::new();
    image::DynamicImage::ImageRgb8(pattern(64, 64))
        .write_to(
            &mut std::io::Cursor::new(&mut webp),
            image::ImageFormat::WebP,
        )
        .unwrap();
    let wpath = dir.join("pic.webp");
    std::fs::write(&wpath, &webp).unwrap();
    assert_eq!(
        load_rgb(&wpath, DEFAULT_MAX_SIDE).unwrap().dimensions(),
        (64, 64)
    );
    let wcut = dir.join("cut.webp");
    std::fs::write(&wcut, &webp[..webp.len() / 2]).unwrap();
    assert_image_error(load_rgb(&wcut, DEFAULT_MAX_SIDE), &wcut, "decode");

    // Formats we do not decode are named.
    let gif = dir.join("anim.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    assert_image_error(load_rgb(&gif, DEFAULT_MAX_SIDE), &gif, "gif");

    // A directory is not an image file.
    assert!(matches!(
        load_rgb(&dir, DEFAULT_MAX_SIDE),
        Err(Error::Image { .. })
    ));
}

/// PNG's CRC-32 (IEEE, reflected).
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn dimension_limit_is_enforced_before_decoding() {
    let dir = scratch_dir("limit");
    let p = dir.join("wide.png");
    save_png_with_text(&p, pattern(300, 20).as_raw(), 300, 20, &[("a", "b")]).unwrap();
    assert_image_error(load_rgb(&p, 256), &p, "beyond the limit of 256");
    assert_eq!(load_rgb(&p, 300).unwrap().dimensions(), (300, 20));
    // A header claiming an absurd size is refused from the header alone.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes()); // IHDR width
    let crc = crc32(&bytes[12..29]); // chunk type + data
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    assert_image_error(
        decode_rgb(&p, &bytes, DEFAULT_MAX_SIDE),
        &p,
        "beyond the limit",
    );
}

#[test]
fn failed_writes_leave_nothing_at_the_destination() {
    let dir = scratch_dir("atomic");
    let img = pattern(4, 4);

    // Wrong buffer size: error, no file.
    let dest = dir.join("a.png");
    let err = save_png_with_text(&dest, &img.as_raw()[..10], 4, 4, &[("k", "v")]).unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    assert!(!dest.exists());

    // A bad keyword fails before anything is written; an existing file stays as it was.
    save_png_with_text(&dest, img.as_raw(), 4, 4, &[("k", "old")]).unwrap();
    let before = std::fs::read(&dest).unwrap();
    let err = save_png_with_text(&dest, img.as_raw(), 4, 4, &[("", "v")]).unwrap_err();
    assert!(err.to_string().contains("keyword"), "{err}");
    assert_eq!(std::fs::read(&dest).unwrap(), before);

    // The rename fails (the destination is a non-empty folder) after the temp file was written:
    // the temp file is removed and the destination untouched.
    let blocker = dir.join("b.png");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("inside"), b"x").unwrap();
    let err = save_png_with_text(&blocker, img.as_raw(), 4, 4, &[("k", "v")]).unwrap_err();
    assert!(err.to_string().contains("b.png"), "{err}");
    assert!(blocker.is_dir());
    assert_eq!(others(&dir, &["a.png", "b.png"]), Vec::<String>::new());

    // A destination folder that does not exist: error naming it, nothing created.
    let nowhere = dir.join("no/such/dir/c.png");
    let err = write_file_atomic(&nowhere, b"data").unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
    assert!(!dir.join("no").exists());
}

#[test]
fn tensors_and_pixels_convert_like_diffusers() {
    let img = pattern(5, 3);
    let t = rgb_to_tensor(&img, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 3, 5]);
    // pixel (x=2, y=1): r = 74, g = 53, b = 33
    let v: Vec<f32> = t.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let at = |c: usize| v[c * 15 + 5 + 2];
    assert!((at(0) - (74.0 / 255.0 * 2.0 - 1.0)).abs() < 1e-6);
    assert!((at(1) - (53.0 / 255.0 * 2.0 - 1.0)).abs() < 1e-6);
    assert_eq!(tensor_to_rgb8(&t).unwrap(), img, "exact round trip");

    // Clamping and half-to-even rounding: x = 2·(k/255) - 1 at k + 0.5 boundaries.
    let vals = [-3.0f32, 3.0, 0.0, f32::NAN];
    let t = Tensor::from_vec(
        vals.iter().flat_map(|&x| [x, x, x]).collect::<Vec<_>>(),
        (4, 1, 3),
        &Device::Cpu,
    )
    .unwrap()
    .permute((2, 0, 1))
    .unwrap();
    let px = tensor_to_rgb8(&t).unwrap();
    let reds: Vec<u8> = (0..4).map(|y| px.get_pixel(0, y)[0]).collect();
    // 0.0 -> 0.5 * 255 = 127.5 -> 128 (half to even)
    assert_eq!(reds, vec![0, 255, 128, 0]);
    assert!(tensor_to_rgb8(&Tensor::zeros((4, 2, 2), DType::F32, &Device::Cpu).unwrap()).is_err());

    let dir = scratch_dir("tensor");
    let p = dir.join("x.png");
    image::DynamicImage::ImageRgb8(img.clone())
        .save(&p)
        .unwrap();
    let loaded = load_image_tensor(&p, 64, &Device::Cpu).unwrap();
    assert_eq!(loaded.dims(), &[1, 3, 3, 5]);
    assert_eq!(tensor_to_rgb8(&loaded).unwrap(), img);
}

#[test]
fn resize_crop_and_flip() {
    let img = pattern(100, 60);
    let r = resize_shorter_side(&img, 30).unwrap();
    assert_eq!(r.dimensions(), (50, 30));
    let r = resize_shorter_side(&pattern(60, 100), 512).unwrap();
    assert_eq!(r.dimensions(), (512, 853));
    assert_eq!(resize_exact(&img, 100, 60).unwrap(), img);
    // Bilinear downscaling of a constant image stays constant.
    let flat = RgbImage::from_pixel(40, 40, image::Rgb([10, 200, 90]));
    assert!(resize_exact(&flat, 13, 7)
        .unwrap()
        .pixels()
        .all(|p| p.0 == [10, 200, 90]));
    assert!(resize_shorter_side(&img, 0).is_err());

    let (x, y) = center_crop_offsets(100, 60, 50, 50).unwrap();
    assert_eq!((x, y), (25, 5));
    let c = crop(&img, x, y, 50, 50).unwrap();
    assert_eq!(c.get_pixel(0, 0), img.get_pixel(25, 5));
    assert!(crop(&img, 60, 0, 50, 50).is_err());

    let mut rng = seeded_rng_(9);
    for _ in 0..100 {
        let (x, y) = random_crop_offsets(100, 60, 40, 60, &mut rng).unwrap();
        assert!(x <= 60 && y == 0);
    }
    assert_eq!(
        random_crop_offsets(100, 60, 40, 60, &mut seeded_rng_(1)).unwrap(),
        random_crop_offsets(100, 60, 40, 60, &mut seeded_rng_(1)).unwrap()
    );
    assert!(random_crop_offsets(10, 10, 11, 1, &mut rng).is_err());

    let f = hflip(&img);
    assert_eq!(f.get_pixel(0, 7), img.get_pixel(99, 7));
    assert_eq!(hflip(&f), img);

    // Tensor versions agree with the image versions.
    let t = rgb_to_tensor(&img, &Device::Cpu).unwrap();
    let tc = crop_tensor(&t, 25, 5, 50, 50).unwrap();
    assert_eq!(tensor_to_rgb8(&tc).unwrap(), c);
    let tf = hflip_tensor(&t).unwrap();
    assert_eq!(tensor_to_rgb8(&tf).unwrap(), f);
    assert!(crop_tensor(&t, 90, 0, 20, 10).is_err());
}
