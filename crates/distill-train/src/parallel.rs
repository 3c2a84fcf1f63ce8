//! Data parallelism: N workers, each on its own share of every optimizer step's rows, summing
//! their gradients before one identical update everywhere.
//!
//! A step's rows are the recipe's `micro_batch x grad_accum`, whatever the number of workers:
//! worker r takes the r-th contiguous share ([`shard`]), so the rows a step sees, the data
//! order and the step count are the one-worker run's, and a run can resume on any number of
//! workers. Every worker scales its gradients by the whole step's loss-token count, so the
//! sum over workers is the one-worker gradient up to the order of f32 additions.
//!
//! With several workers the optimizer's state is sharded too (ZeRO stage 1,
//! [`crate::optim::AdamW::shard`]): each gradient group is summed onto the worker that owns
//! it, which keeps the AdamW moments of its parameters, updates them and sends the new values
//! to the others.
//!
//! [`Collective`] is the transport: [`Solo`] for one worker, [`LocalGroup`] for workers that are
//! threads of one process summing through host memory (CPU runs and the tests), and NCCL on
//! CUDA devices (`crate::nccl`, with the `cuda` feature).

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

/// Sums across the workers of one data-parallel group. Every worker calls the same methods
/// in the same order with tensors of the same shapes; a worker that stops early (an error)
/// must make the others' calls fail rather than wait forever.
pub trait Collective<B: Backend>: Send + Sync {
    /// This worker's index, 0-based; worker 0 writes the run's files.
    fn rank(&self) -> usize;
    /// How many workers the group has.
    fn world(&self) -> usize;
    /// Σ over workers of `x`, an f32 [N] tensor; every worker gets the same values.
    fn all_reduce_sum(&self, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError>;
    /// Σ over workers of `x` (f32 [N]) on worker `root` (Some there, None elsewhere). By
    /// default an [`Collective::all_reduce_sum`] whose result only `root` keeps.
    fn reduce_sum(&self, root: usize, x: Tensor<B, 1>) -> Result<Option<Tensor<B, 1>>, CollectiveError> {
        let summed = self.all_reduce_sum(x)?;
        Ok((self.rank() == root).then_some(summed))
    }
    /// Worker `root`'s `x` (f32 [N]) on every worker; the others' `x` gives only the length.
    /// By default an [`Collective::all_reduce_sum`] in which the others add zeros.
    fn broadcast(&self, root: usize, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError> {
        let x = if self.rank() == root { x } else { x.zeros_like() };
        self.all_reduce_sum(x)
    }
    /// Σ over workers of a few host numbers (loss sums, counters).
    fn all_reduce_host(&self, xs: &[f64]) -> Result<Vec<f64>, CollectiveError>;
    /// Every worker's `mine`, in rank order, on every worker: two [`Collective::all_reduce_host`]
    /// calls (the lengths, then each worker's bytes in its own stretch of zeros). For small
    /// things: buffered on-policy samples at a checkpoint.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let (rank, world) = (self.rank(), self.world());
        let mut lens = vec![0.0; world];
        lens[rank] = mine.len() as f64;
        let lens: Vec<usize> = self.all_reduce_host(&lens)?.iter().map(|&l| l as usize).collect();
        let total: usize = lens.iter().sum();
        // Sums may travel as f32 (NCCL): exact for whole numbers up to 2^24.
        if total > 1 << 24 {
            return Err(CollectiveError {
                rank,
                world,
                message: format!("{total} bytes to gather; at most 16 MiB go this way"),
            });
        }
        let start: usize = lens[..rank].iter().sum();
        let mut spread = vec![0.0; total];
        for (slot, &b) in spread[start..].iter_mut().zip(mine) {
            *slot = f64::from(b);
        }
        let all = self.all_reduce_host(&spread)?;
        let mut at = 0;
        Ok(lens
            .iter()
            .map(|&n| {
                let part = all[at..at + n].iter().map(|&b| b as u8).collect();
                at += n;
                part
            })
            .collect())
    }
    /// Returns once every worker has called it.
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.all_reduce_host(&[0.0]).map(|_| ())
    }
    /// Tells the other workers this one has stopped: their pending and later calls fail.
    fn abort(&self, why: &str);
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("data-parallel worker {rank} of {world}: {message}")]
pub struct CollectiveError {
    pub rank: usize,
    pub world: usize,
    pub message: String,
}

/// The rows of `0..rows` that worker `rank` of `world` trains on: the rank-th of `world`
/// contiguous shares, sizes differing by at most one (the first ones larger).
pub fn shard(rows: usize, rank: usize, world: usize) -> Range<usize> {
    let (base, extra) = (rows / world, rows % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// One worker alone: every sum is the value itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl<B: Backend> Collective<B> for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError> {
        Ok(x)
    }
    fn all_reduce_host(&self, xs: &[f64]) -> Result<Vec<f64>, CollectiveError> {
        Ok(xs.to_vec())
    }
    fn abort(&self, _why: &str) {}
}

/// Workers that are threads of one process, summing through host memory: each posts its
/// values, and once all have posted, each adds them up in rank order (so every worker gets
/// bit-identical sums). For CPU training and for testing the data-parallel step.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    state: Mutex<Round>,
    turn: Condvar,
}

/// One exchange: the values each worker posted, then how many have read the sums.
struct Round {
    posted: Vec<Option<Vec<f64>>>,
    read: usize,
    sums: Option<Arc<Vec<f64>>>,
    aborted: Option<String>,
}

impl LocalGroup {
    /// The `world` members of a new group, rank 0 first; give each to its own thread.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(Round {
                posted: vec![None; world],
                read: 0,
                sums: None,
                aborted: None,
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn error(&self, message: String) -> CollectiveError {
        CollectiveError {
            rank: self.rank,
            world: self.shared.world,
            message,
        }
    }

    /// Posts `values`, waits for every worker's, and returns their element-wise sum.
    fn exchange(&self, values: Vec<f64>) -> Result<Arc<Vec<f64>>, CollectiveError> {
        let s = &self.shared;
        let mut round = s.state.lock().unwrap_or_else(|e| e.into_inner());
        // A worker fast enough to come back before the last one has read the previous sums
        // waits for that round to end.
        while round.sums.is_some() && round.aborted.is_none() {
            round = s.turn.wait(round).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(why) = &round.aborted {
            return Err(self.error(format!("another worker stopped: {why}")));
        }
        if let Some(first) = round.posted.iter().flatten().next()
            && first.len() != values.len()
        {
            let message = format!(
                "posted {} values where another posted {}: the workers are out of step",
                values.len(),
                first.len()
            );
            round.aborted = Some(message.clone());
            s.turn.notify_all();
            return Err(self.error(message));
        }
        round.posted[self.rank] = Some(values);
        if round.posted.iter().all(Option::is_some) {
            let mut sums = vec![0.0; round.posted[0].as_ref().map_or(0, Vec::len)];
            for part in round.posted.iter_mut() {
                for (sum, x) in sums.iter_mut().zip(part.take().unwrap_or_default()) {
                    *sum += x;
                }
            }
            round.sums = Some(Arc::new(sums));
            s.turn.notify_all();
        }
        // The sums stay until every worker, this one among them, has read them.
        while round.sums.is_none() && round.aborted.is_none() {
            round = s.turn.wait(round).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(why) = &round.aborted {
            return Err(self.error(format!("another worker stopped: {why}")));
        }
        let sums = round.sums.clone().unwrap_or_default();
        round.read += 1;
        if round.read == s.world {
            round.read = 0;
            round.sums = None;
            s.turn.notify_all();
        }
        Ok(sums)
    }
}

impl<B: Backend> Collective<B> for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, CollectiveError> {
        let device = x.device();
        let values: Vec<f64> = x
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| self.error(format!("reading a gradient to the host: {e:?}")))?
            .into_iter()
            .map(f64::from)
            .collect();
        let sums = self.exchange(values)?;
        let f32s: Vec<f32> = sums.iter().map(|&s| s as f32).collect();
        let n = f32s.len();
        Ok(Tensor::from_data(
            TensorData::new(f32s, [n]),
            (&device, DType::F32),
        ))
    }

    fn all_reduce_host(&self, xs: &[f64]) -> Result<Vec<f64>, CollectiveError> {
        Ok(self.exchange(xs.to_vec())?.to_vec())
    }

    fn abort(&self, why: &str) {
        let mut round = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if round.aborted.is_none() {
            round.aborted = Some(format!("worker {}: {why}", self.rank));
        }
        self.shared.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn shards_cover_the_rows_once_in_order() {
        for rows in 0..20 {
            for world in 1..6 {
                let parts: Vec<Range<usize>> = (0..world).map(|r| shard(rows, r, world)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[world - 1].end, rows);
                for pair in parts.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                    assert!(pair[0].len() >= pair[1].len() && pair[0].len() - pair[1].len() <= 1);
                }
            }
        }
        assert_eq!(shard(10, 1, 4), 3..6);
        assert_eq!(shard(10, 3, 4), 8..10);
    }

    /// Three workers over many rounds: every one gets the same sums, in step.
    #[test]
    fn a_local_group_sums_every_round_alike() {
        let members = LocalGroup::new(3);
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .iter()
                .map(|m| {
                    s.spawn(move || {
                        (0..50)
                            .map(|round| {
                                let r = Collective::<Flex>::rank(m) as f32;
                                let x = Tensor::<Flex, 1>::from_floats(
                                    [r, round as f32, 1.0],
                                    &Default::default(),
                                );
                                let sum = m.all_reduce_sum(x).unwrap();
                                sum.into_data().to_vec::<f32>().unwrap()
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (round, sums) in results[0].iter().enumerate() {
            assert_eq!(sums, &vec![3.0, 3.0 * round as f32, 3.0]);
        }
        assert!(results.iter().all(|r| r == &results[0]));
    }

    #[test]
    fn bytes_gathered_come_back_whole_in_rank_order() {
        let members = LocalGroup::new(3);
        let mine = |rank: usize| -> Vec<u8> { (0..rank * 300).map(|i| (i * 7 + rank) as u8).collect() };
        let all: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .iter()
                .enumerate()
                .map(|(rank, m)| {
                    s.spawn(move || Collective::<Flex>::all_gather_bytes(m, &mine(rank)).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for got in all {
            assert_eq!(got, vec![mine(0), mine(1), mine(2)]);
        }
    }

    /// A worker that stops makes the others' waiting calls fail instead of hanging.
    #[test]
    fn an_aborted_worker_releases_the_others() {
        let members = LocalGroup::new(2);
        std::thread::scope(|s| {
            let waiting = s.spawn(|| Collective::<Flex>::all_reduce_host(&members[0], &[1.0]));
            std::thread::sleep(std::time::Duration::from_millis(50));
            Collective::<Flex>::abort(&members[1], "out of memory");
            let err = waiting.join().unwrap().unwrap_err();
            assert!(err.to_string().contains("worker 1: out of memory"), "{err}");
        });
        let err = Collective::<Flex>::barrier(&members[0]).unwrap_err();
        assert!(err.to_string().contains("another worker stopped"), "{err}");
    }
}
