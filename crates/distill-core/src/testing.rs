//! Support for the workspace's tests, in one place: where the fixtures are, when a GPU test may
//! skip, a small seeded generator for test inputs, and a snapshot of a directory (to show a refused command
//! touched nothing). No burn dependency: the rule and the generator are plain
//! logic, used by the CPU and the CUDA builds alike.

/// Set to `1` where a GPU is expected (the GPU test command in the README): a GPU test that
/// cannot run there (no CUDA device, libcuda or libcublas missing, ...) fails instead of
/// printing `SKIPPED` and passing, so a run on a broken GPU machine cannot pass empty.
pub const REQUIRE_GPU: &str = "DISTILL_REQUIRE_GPU";

/// What a GPU test does; see [`gpu_test`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuTest {
    /// What it needs is there.
    Run,
    /// It is not, and no GPU was required: print `SKIPPED` and pass.
    Skip,
    /// It is not, but [`REQUIRE_GPU`] asks for a GPU: fail.
    Fail,
}

/// The rule every GPU test follows: `require` is [`REQUIRE_GPU`]'s value (None: unset),
/// `found` whether the test found what it needs (a CUDA device, or what else it checks).
/// Unset, empty, `0`, `false` and `no` allow a skip; any other value (`1`, or one not
/// understood) requires the GPU, so a typo fails rather than passes empty.
pub fn gpu_test(require: Option<&str>, found: bool) -> GpuTest {
    if found {
        return GpuTest::Run;
    }
    let allows_skip = match require.map(str::trim) {
        None => true,
        Some(v) => ["", "0", "false", "no"].iter().any(|s| v.eq_ignore_ascii_case(s)),
    };
    if allows_skip { GpuTest::Skip } else { GpuTest::Fail }
}

/// For a GPU test that cannot run here (`why`: "no CUDA device", ...): prints
/// `SKIPPED: why` so the test passes, or panics with `why` under [`REQUIRE_GPU`]=1.
/// The caller returns from the test after this.
pub fn skip_gpu_test(why: &str) {
    let require = std::env::var_os(REQUIRE_GPU).map(|v| v.to_string_lossy().into_owned());
    match gpu_test(require.as_deref(), false) {
        GpuTest::Fail => panic!(
            "{REQUIRE_GPU}={:?} but this GPU test cannot run: {why}",
            require.unwrap_or_default()
        ),
        GpuTest::Skip | GpuTest::Run => {
            eprintln!("SKIPPED: {why} ({REQUIRE_GPU}=1 makes this a failure)")
        }
    }
}

/// `found` as is, or None after [`skip_gpu_test`] (which panics under [`REQUIRE_GPU`]=1):
/// `let Some(device) = require_gpu(find(), "no CUDA device") else { return };`
pub fn require_gpu<T>(found: Option<T>, why: &str) -> Option<T> {
    if found.is_none() {
        skip_gpu_test(why);
    }
    found
}

/// A seeded generator for test inputs (splitmix64; normals by Box-Muller). Each test makes its
/// own, so its inputs are the same whichever tests run beside it: burn's `Backend::seed` sets
/// one generator for the whole process, which every test of the binary draws from.
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.uniform(), self.uniform()); // u in (0, 1]
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// `n` values of N(mean, std²), as f32.
    pub fn normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n).map(|_| (mean + std * self.normal()) as f32).collect()
    }
}

/// A file of a [`snapshot`]: its path, bytes and modification time.
pub type FileState = (std::path::PathBuf, Vec<u8>, std::time::SystemTime);

/// Every file under `dir`, recursively, sorted by path: two equal snapshots mean nothing was
/// written, created or removed in between. Panics on I/O errors (tests only).
pub fn snapshot(dir: &std::path::Path) -> Vec<FileState> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(snapshot(&path));
        } else {
            let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
            out.push((path.clone(), std::fs::read(&path).unwrap(), modified));
        }
    }
    out.sort();
    out
}

/// The repository's tests/fixtures, or $DISTILL_FIXTURES when a test binary runs away from
/// the source tree it was built in (as on the GPU machine).
pub fn fixtures() -> std::path::PathBuf {
    std::env::var_os("DISTILL_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// The training tests' recipe: the tiny Qwen2 student on the fixture dataset, writing under
/// `out`, 4 rows of 256 tokens a step (2 x 2), CE only; `extra` overrides as `--set` does.
pub fn tiny_train_recipe(out: &std::path::Path, extra: &[&str]) -> crate::Recipe {
    let fx = fixtures();
    let path = |p: std::path::PathBuf| format!("{:?}", p.to_str().expect("fixture paths are UTF-8"));
    let mut sets = vec![
        format!("student.model={}", path(fx.join("tiny-qwen2"))),
        format!("data.dataset={}", path(fx.join("dataset"))),
        format!("train.out={}", path(out.to_path_buf())),
        "data.held_out=0.1".into(),
        "train.seq_len=256".into(),
        "train.micro_batch=2".into(),
        "train.grad_accum=2".into(),
        "train.warmup_steps=2".into(),
        "train.checkpoint_every=3".into(),
        "loss.kd_ratio=0.0".into(),
        "loss.chunk_tokens=100".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    crate::Recipe::parse("name = \"t\"\n", std::path::Path::new("test.toml"), &sets)
        .expect("the tiny training recipe parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_test_runs_when_it_finds_its_gpu_whatever_the_variable_says() {
        for require in [None, Some(""), Some("0"), Some("1"), Some("yes please")] {
            assert_eq!(gpu_test(require, true), GpuTest::Run, "{require:?}");
        }
    }

    #[test]
    fn without_a_gpu_it_skips_unless_one_is_required() {
        for require in [None, Some(""), Some("0"), Some(" 0 "), Some("false"), Some("NO")] {
            assert_eq!(gpu_test(require, false), GpuTest::Skip, "{require:?}");
        }
        for require in [
            Some("1"),
            Some(" 1\n"),
            Some("true"),
            Some("yes"),
            Some("2"),
            Some("on"),
        ] {
            assert_eq!(gpu_test(require, false), GpuTest::Fail, "{require:?}");
        }
    }

    #[test]
    fn require_gpu_passes_a_found_gpu_through() {
        // Found: no skip, no panic, whatever the environment holds.
        assert_eq!(require_gpu(Some(7), "unused"), Some(7));
    }

    #[test]
    fn the_generator_repeats_for_a_seed_and_is_roughly_standard_normal() {
        let (a, b) = (
            TestRng::new(3).normal_vec(4, 0.0, 1.0),
            TestRng::new(3).normal_vec(4, 0.0, 1.0),
        );
        assert_eq!(a, b);
        assert_ne!(a, TestRng::new(4).normal_vec(4, 0.0, 1.0));
        let xs = TestRng::new(1).normal_vec(20_000, 2.0, 0.5);
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            (mean - 2.0).abs() < 0.02 && (var.sqrt() - 0.5).abs() < 0.02,
            "{mean} {var}"
        );
        let mut rng = TestRng::new(9);
        assert!((0..1000).map(|_| rng.uniform()).all(|u| (0.0..1.0).contains(&u)));
    }
}
