//! The toy-world analyser: exact on clean renders, robust to mild degradation (blur, noise,
//! colour shifts like a small diffusion model's outputs), no false objects on garbage images,
//! and a scoring that matches objects by content rather than by order.
//!
//! `cargo test --test toy_analyse -- --nocapture` prints the measured accuracies.

use pairstyle::engine::image_io::RgbImage;
use pairstyle::toy::analyse::{
    accuracy_on_clean_renders, analyse, check_scene, leaks_reference, Analyser, Attribute,
    AttributeAccuracy, Palette,
};
use pairstyle::toy::{Background, Colour, Object, Position, Scene, ShapeKind, Size, StyleKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mild degradation of a render, seeded: every palette colour (not the background) shifted by a
/// random offset in ±`shift` per channel, independent noise in ±`noise` per channel, then an
/// optional 3 × 3 box blur.
fn degrade(img: &RgbImage, bg: [u8; 3], seed: u64, shift: i32, noise: i32, blur: bool) -> RgbImage {
    let mut rng = StdRng::seed_from_u64(seed);
    let offsets: Vec<[i32; 3]> = Colour::ALL
        .iter()
        .map(|_| std::array::from_fn(|_| rng.random_range(-shift..=shift)))
        .collect();
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let off = Colour::ALL
            .iter()
            .position(|c| c.rgb() == p.0 && p.0 != bg)
            .map(|k| offsets[k])
            .unwrap_or([0; 3]);
        for (c, o) in p.0.iter_mut().zip(off) {
            let n = if noise > 0 {
                rng.random_range(-noise..=noise)
            } else {
                0
            };
            *c = (*c as i32 + o + n).clamp(0, 255) as u8;
        }
    }
    if blur {
        let src = out.clone();
        let (w, h) = src.dimensions();
        for y in 0..h {
            for x in 0..w {
                let mut sum = [0u32; 3];
                let mut cnt = 0;
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                        if nx >= 0 && ny >= 0 && nx < w as i64 && ny < h as i64 {
                            let q = src.get_pixel(nx as u32, ny as u32).0;
                            for k in 0..3 {
                                sum[k] += q[k] as u32;
                            }
                            cnt += 1;
                        }
                    }
                }
                out.put_pixel(x, y, image::Rgb(sum.map(|s| ((s + cnt / 2) / cnt) as u8)));
            }
        }
    }
    out
}

/// A degradation of a scene's render, seeded.
type Degrade = Box<dyn Fn(&Scene, RgbImage, u64) -> RgbImage>;

/// Accuracy over `n` random scenes at `res`, each image passed through `f` first, with the
/// lowest and 1st-percentile confidence of the matched detections.
fn accuracy_with(
    n: usize,
    seed: u64,
    res: u32,
    analyser: &Analyser,
    f: impl Fn(&Scene, RgbImage, u64) -> RgbImage,
) -> (AttributeAccuracy, f64, f64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acc = AttributeAccuracy::default();
    let mut conf = Vec::new();
    for i in 0..n {
        let scene = Scene::random(&mut rng);
        let img = f(&scene, scene.render(res).unwrap(), seed ^ ((i as u64) << 8));
        let c = check_scene(&scene, &analyser.analyse(&img));
        conf.extend(
            c.objects
                .iter()
                .filter_map(|o| o.detected.as_ref())
                .map(|d| d.confidence),
        );
        acc.add(&c);
    }
    conf.sort_by(f64::total_cmp);
    let min = conf.first().copied().unwrap_or(0.0);
    let p1 = conf.get(conf.len() / 100).copied().unwrap_or(0.0);
    (acc, min, p1)
}

#[test]
fn clean_renders_at_64_are_exact() {
    let t = std::time::Instant::now();
    let acc = accuracy_on_clean_renders(1000, 2024, 64).unwrap();
    let ms = t.elapsed().as_secs_f64() * 1000.0 / 1000.0;
    println!("clean 64 px: {acc} ({ms:.2} ms per image)");
    assert_eq!(acc.scenes, 1000);
    assert!(acc.objects >= 1400, "{acc}");
    for a in Attribute::ALL {
        assert!(acc.percent(*a) >= 98.0, "{a}: {acc}");
    }
    assert_eq!(acc.missing, 0, "{acc}");
    assert_eq!(acc.unmatched, 0, "{acc}");
}

#[test]
fn clean_renders_at_other_resolutions() {
    for (res, n) in [
        (65u32, 200usize),
        (96, 200),
        (128, 150),
        (256, 40),
        (512, 12),
    ] {
        let t = std::time::Instant::now();
        let acc = accuracy_on_clean_renders(n, 77 + res as u64, res).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
        println!("clean {res} px: {acc} ({ms:.2} ms per image)");
        assert!(acc.min_percent() >= 98.0, "{res}: {acc}");
    }
}

#[test]
fn robust_to_mild_degradation() {
    let plain = Analyser::default();
    let cases: Vec<(&str, f64, Degrade)> = vec![
        (
            "colour shift ±20",
            99.0,
            Box::new(|s: &Scene, img: RgbImage, seed| {
                degrade(&img, s.background().rgb(), seed, 20, 0, false)
            }),
        ),
        (
            "noise ±24",
            99.0,
            Box::new(|s: &Scene, img: RgbImage, seed| {
                degrade(&img, s.background().rgb(), seed, 0, 24, false)
            }),
        ),
        (
            "blur 3x3",
            99.0,
            Box::new(|s: &Scene, img: RgbImage, seed| {
                degrade(&img, s.background().rgb(), seed, 0, 0, true)
            }),
        ),
        (
            "shift ±20 + noise ±16 + blur 3x3",
            97.0,
            Box::new(|s: &Scene, img: RgbImage, seed| {
                degrade(&img, s.background().rgb(), seed, 20, 16, true)
            }),
        ),
        (
            "style blur (5x5 box)",
            95.0,
            Box::new(|_: &Scene, img: RgbImage, _| StyleKind::Blur.apply(&img, 0)),
        ),
        (
            "style grain (±40 mono)",
            98.0,
            Box::new(|_: &Scene, img: RgbImage, seed| StyleKind::Grain.apply(&img, seed)),
        ),
    ];
    for (name, floor, f) in cases {
        let (acc, min, p1) = accuracy_with(1000, 99, 64, &plain, f);
        println!("{name} at 64 px: {acc}; confidence min {min:.2}, 1st percentile {p1:.2}");
        for a in Attribute::ALL {
            assert!(
                acc.percent(*a) >= floor,
                "{name}: {a} below {floor} %: {acc}"
            );
        }
    }
}

/// Render `scene` with every object moved by up to ±`jitter` × `res` from its cell centre and
/// scaled by 1 ± `scale` (a model never places shapes exactly), seeded.
fn render_jittered(scene: &Scene, res: u32, jitter: f64, scale: f64, seed: u64) -> RgbImage {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut img = RgbImage::from_pixel(res, res, image::Rgb(scene.background().rgb()));
    for o in scene.objects() {
        let (cx, cy) = o.position.centre(res);
        let cx = cx + rng.random_range(-jitter..=jitter) * res as f64;
        let cy = cy + rng.random_range(-jitter..=jitter) * res as f64;
        let r = o.size.half_extent() * res as f64 * (1.0 + rng.random_range(-scale..=scale));
        for (x, y, p) in img.enumerate_pixels_mut() {
            let u = (x as f64 + 0.5 - cx) / r;
            let v = (y as f64 + 0.5 - cy) / r;
            if u.abs() <= 1.0 && v.abs() <= 1.0 && o.shape.contains(u, v) {
                p.0 = o.colour.rgb();
            }
        }
    }
    img
}

#[test]
fn off_grid_objects() {
    // Shapes up to 2 px (at 64) off their cell centre and 12 % off their nominal size, then
    // colour shift, noise and blur: what a small model's output looks like.
    let (crisp, _, _) = accuracy_with(500, 21, 64, &Analyser::default(), |s, _, seed| {
        render_jittered(s, 64, 0.03, 0.12, seed)
    });
    println!("off grid, crisp: {crisp}");
    let (soft, min, p1) = accuracy_with(500, 21, 64, &Analyser::default(), |s, _, seed| {
        let img = render_jittered(s, 64, 0.03, 0.12, seed);
        degrade(&img, s.background().rgb(), seed, 20, 16, true)
    });
    println!("off grid, degraded: {soft}; confidence min {min:.2}, 1st percentile {p1:.2}");
    assert!(crisp.min_percent() >= 98.0, "{crisp}");
    assert!(soft.min_percent() >= 95.0, "{soft}");
}

#[test]
fn two_object_scenes() {
    // Every two-object scene from a long random stream, at 64 px, clean and blurred.
    let mut rng = StdRng::seed_from_u64(31);
    let (mut clean, mut blurred) = (AttributeAccuracy::default(), AttributeAccuracy::default());
    while clean.scenes < 500 {
        let scene = Scene::random(&mut rng);
        if scene.objects().len() != 2 {
            continue;
        }
        let img = scene.render(64).unwrap();
        clean.add(&check_scene(&scene, &analyse(&img)));
        let b = StyleKind::Blur.apply(&img, 0);
        blurred.add(&check_scene(&scene, &analyse(&b)));
    }
    println!("two objects, clean: {clean}");
    println!("two objects, 5x5 blur: {blurred}");
    assert_eq!(clean.all_correct, clean.objects, "{clean}");
    assert!(blurred.min_percent() >= 95.0, "{blurred}");

    // Neighbours of one colour that a blur joins are still two objects.
    for (a, b) in [
        (Position::Top, Position::TopRight),
        (Position::Left, Position::Center),
        (Position::Center, Position::Bottom),
        (Position::TopLeft, Position::Center),
    ] {
        let obj = |position| Object {
            shape: ShapeKind::Circle,
            colour: Colour::Red,
            size: Size::Large,
            position,
        };
        let scene = Scene::new(vec![obj(a), obj(b)], Background::White).unwrap();
        let img = StyleKind::Blur.apply(&scene.render(64).unwrap(), 0);
        let check = check_scene(&scene, &analyse(&img));
        assert!(check.all_correct(), "{scene}: {check:#?}");
        assert_eq!(check.unmatched, 0, "{scene}: {check:#?}");
    }
}

#[test]
fn garbage_images_give_no_confident_objects() {
    // Uniform images of every palette and background colour, and of random colours.
    let mut rng = StdRng::seed_from_u64(5);
    let mut uniform: Vec<[u8; 3]> = Colour::ALL.iter().map(|c| c.rgb()).collect();
    uniform.extend(Background::ALL.iter().map(|b| b.rgb()));
    uniform.extend((0..20).map(|_| std::array::from_fn(|_| rng.random())));
    for rgb in uniform {
        for side in [64u32, 97] {
            let img = RgbImage::from_pixel(side, side, image::Rgb(rgb));
            let a = analyse(&img);
            assert!(a.objects.is_empty(), "uniform {rgb:?}: {a:#?}");
            assert_eq!(a.background_rgb, rgb);
        }
    }
    // Random noise (independent uniform channels), at several sizes.
    let mut worst = 0f64;
    let mut total = 0usize;
    for (k, side) in [64u32, 64, 64, 64, 80, 128, 200].into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(100 + k as u64);
        let img = RgbImage::from_fn(side, side, |_, _| image::Rgb(rng.random()));
        let a = analyse(&img);
        total += a.objects.len();
        for d in &a.objects {
            worst = worst.max(d.confidence);
        }
        assert!(
            a.background_fraction < 0.5,
            "noise {side}: background fraction {}",
            a.background_fraction
        );
    }
    println!("random noise: {total} objects in 7 images, best confidence {worst:.2}");
    assert!(total <= 2 && worst < 0.6, "{total} objects, best {worst}");
    // A background with sparse salt-and-pepper specks: no object.
    let mut rng = StdRng::seed_from_u64(9);
    let img = RgbImage::from_fn(64, 64, |_, _| {
        if rng.random_range(0..50) == 0 {
            image::Rgb(rng.random())
        } else {
            image::Rgb(Background::Grey.rgb())
        }
    });
    let a = analyse(&img);
    assert!(a.objects.is_empty(), "{a:#?}");
    assert_eq!(a.background, Background::Grey);
}

#[test]
fn odd_inputs_never_panic() {
    for (w, h) in [
        (0u32, 0u32),
        (0, 5),
        (1, 1),
        (3, 7),
        (10, 10),
        (63, 63),
        (64, 100),
        (300, 20),
    ] {
        let img = RgbImage::from_pixel(w, h, image::Rgb([128, 128, 128]));
        let a = analyse(&img);
        assert_eq!((a.width, a.height), (w, h));
        assert!(a.objects.is_empty(), "{w}x{h}: {a:#?}");
    }
    // A render stretched to a non-square shape is still read (resampled to a square).
    let scene = Scene::parse("a large blue star in the center, on a sand background").unwrap();
    let img = scene.render(96).unwrap();
    let wide = image::imageops::resize(&img, 128, 96, image::imageops::FilterType::Nearest);
    let a = analyse(&wide);
    let check = check_scene(&scene, &a);
    assert!(check.background && check.objects[0].colour, "{a:#?}");
    assert!(check.objects[0].position, "{a:#?}");
    let (cx, cy) = a.objects[0].centre;
    assert!((cx - 64.0).abs() < 3.0 && (cy - 48.0).abs() < 3.0, "{a:#?}");
}

#[test]
fn analysis_is_deterministic_and_reads_back_the_scene() {
    let mut rng = StdRng::seed_from_u64(8);
    for _ in 0..100 {
        let scene = Scene::random(&mut rng);
        let img = scene.render(64).unwrap();
        let a = analyse(&img);
        assert_eq!(a, analyse(&img));
        let back = a.to_scene().expect("a scene");
        let mut want: Vec<Object> = scene.objects().to_vec();
        want.sort_by_key(|o| o.position);
        assert_eq!(back.objects(), &want[..], "{scene}");
        assert_eq!(back.background(), scene.background());
        for d in &a.objects {
            assert!((d.confidence - 1.0).abs() < 1e-12, "{scene}: {d:?}");
            assert!(d.pixels > 0 && d.colour_distance < 1.0);
        }
    }
}

fn obj(shape: ShapeKind, colour: Colour, size: Size, position: Position) -> Object {
    Object {
        shape,
        colour,
        size,
        position,
    }
}

#[test]
fn scoring_matches_by_content_not_order() {
    let star = obj(ShapeKind::Star, Colour::Red, Size::Large, Position::Left);
    let ring = obj(
        ShapeKind::Ring,
        Colour::Blue,
        Size::Small,
        Position::TopRight,
    );
    let both = Scene::new(vec![star, ring], Background::Grey).unwrap();
    let swapped = Scene::new(vec![ring, star], Background::Grey).unwrap();
    let analysis = analyse(&both.render(64).unwrap());

    // The expected order does not matter.
    for expected in [&both, &swapped] {
        let c = check_scene(expected, &analysis);
        assert!(c.all_correct(), "{c:#?}");
        assert_eq!(c.unmatched, 0);
        assert_eq!(c.objects[0].expected, expected.objects()[0]);
    }

    // An object the image lacks is wrong on every attribute; the other still matches.
    let only_star = analyse(
        &Scene::new(vec![star], Background::Grey)
            .unwrap()
            .render(64)
            .unwrap(),
    );
    let c = check_scene(&both, &only_star);
    assert!(c.objects[0].all_correct(), "{c:#?}");
    let missing = &c.objects[1];
    assert!(missing.detected.is_none());
    for a in [
        Attribute::Colour,
        Attribute::Shape,
        Attribute::Position,
        Attribute::Size,
    ] {
        assert!(!missing.is_correct(a), "{a}");
    }
    let mut acc = AttributeAccuracy::default();
    acc.add(&c);
    assert_eq!((acc.objects, acc.colour, acc.missing), (2, 1, 1));
    assert_eq!(acc.percent(Attribute::Shape), 50.0);
    assert_eq!(acc.percent(Attribute::Background), 100.0);

    // An extra object is unmatched; a wrong background is counted once.
    let c = check_scene(
        &Scene::new(vec![star], Background::White).unwrap(),
        &analysis,
    );
    assert!(c.objects[0].all_correct() && !c.background);
    assert_eq!(c.unmatched, 1);

    // Wrong attributes are marked one by one: a red star drawn as a small red square.
    let drawn = Scene::new(
        vec![obj(
            ShapeKind::Square,
            Colour::Red,
            Size::Small,
            Position::Left,
        )],
        Background::Grey,
    )
    .unwrap();
    let c = check_scene(
        &Scene::new(vec![star], Background::Grey).unwrap(),
        &analyse(&drawn.render(64).unwrap()),
    );
    let o = &c.objects[0];
    assert!(o.colour && o.position && !o.shape && !o.size, "{o:#?}");

    // Two objects of one expected scene never match the same detection.
    let twice = Scene::new(
        vec![
            star,
            obj(ShapeKind::Star, Colour::Red, Size::Large, Position::Right),
        ],
        Background::Grey,
    )
    .unwrap();
    let c = check_scene(&twice, &only_star);
    assert_eq!(c.objects.iter().filter(|o| o.detected.is_some()).count(), 1);
    assert!(c.objects[0].all_correct() && c.objects[1].detected.is_none());

    // Counters merge and report.
    let mut total = AttributeAccuracy::default();
    total.merge(&acc);
    total.merge(&acc);
    assert_eq!(total.objects, 4);
    assert_eq!(total.scenes, 2);
    assert_eq!(total.all_correct_percent(), 50.0);
    assert_eq!(total.min_percent(), 50.0);
    assert!(total.to_string().contains("colour 50.0 %"), "{total}");
    assert_eq!(AttributeAccuracy::default().percent(Attribute::Colour), 0.0);
}

#[test]
fn content_leakage() {
    let reference = Scene::parse("a large red star on the left, on a grey background").unwrap();
    let prompt = Scene::parse("a small blue circle at the top, on a grey background").unwrap();
    // An output that drew the prompt: no leak.
    let good = analyse(&prompt.render(64).unwrap());
    assert_eq!(leaks_reference(&prompt, &good, &reference), Some(false));
    // An output that drew the training scene's red star where the circle belongs: a leak.
    let copied = Scene::parse("a small red star at the top, on a grey background").unwrap();
    let bad = analyse(&copied.render(64).unwrap());
    assert_eq!(leaks_reference(&prompt, &bad, &reference), Some(true));
    let c = check_scene(&prompt, &bad);
    let det = c.objects[0].detected.as_ref().unwrap();
    assert!(pairstyle::toy::copies_reference(
        &prompt.objects()[0],
        det,
        &reference
    ));
    // Only the shape copied: not a (shape, colour) leak.
    let half = Scene::parse("a small blue star at the top, on a grey background").unwrap();
    let h = analyse(&half.render(64).unwrap());
    assert_eq!(leaks_reference(&prompt, &h, &reference), Some(false));
    // A prompt that asks for the reference's own pair: leakage cannot be told.
    let same = Scene::parse("a small red star at the top, on a grey background").unwrap();
    assert_eq!(leaks_reference(&same, &bad, &reference), None);
    assert!(!pairstyle::toy::copies_reference(
        &same.objects()[0],
        det,
        &reference
    ));
}

#[test]
fn stylised_images_with_a_styled_palette() {
    // Pixel-wise styles change the colours; the styled palette reads them back.
    for style in StyleKind::ALL.iter().copied() {
        let palette = Palette::styled(style);
        let analyser = Analyser::new(palette.clone());
        let (acc, _, _) = accuracy_with(200, 12, 64, &analyser, |_, img, seed| {
            style.apply(&img, seed)
        });
        println!(
            "{style:>9} (palette separation ΔE {:5.1}): {acc}",
            palette.min_separation()
        );
        if matches!(
            style,
            StyleKind::Invert | StyleKind::Posterise | StyleKind::Blur
        ) {
            assert!(acc.min_percent() >= 95.0, "{style}: {acc}");
        }
    }
    assert_eq!(Palette::styled(StyleKind::Blur), Palette::world());
    assert_eq!(
        Palette::styled(StyleKind::Invert).colour_rgb(Colour::Red),
        [35, 215, 215]
    );
    assert!(Palette::world().min_separation() > 25.0);
}
