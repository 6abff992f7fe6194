use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use petal_core::strategy::FedAvg;
use petal_core::{
    Client, Config, CoreError, EvaluateIns, EvaluateRes, FedAvgConfig, FitIns, FitRes, History,
    Parameters, RunConfig, Scalar, Tensor, config_f64, run_federation,
};

use super::*;

/// A replica whose "training" is a function of the client, the round and
/// the model only, plus a record of which worker ran which client.
struct Toy {
    worker: usize,
    ran: Arc<Mutex<Vec<(usize, usize)>>>,
}

struct ToyClient<'a> {
    partition: usize,
    toy: &'a mut Toy,
}

impl Replica for Toy {
    fn client(&mut self, partition: usize) -> Result<Box<dyn Client + '_>, CoreError> {
        Ok(Box::new(ToyClient {
            partition,
            toy: self,
        }))
    }
}

impl Client for ToyClient<'_> {
    fn get_parameters(&mut self, _: &Config) -> Result<Parameters, CoreError> {
        Ok(Parameters::new(vec![Tensor::new(vec![3], vec![0.5; 3])?]))
    }
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        self.toy
            .ran
            .lock()
            .unwrap()
            .push((self.toy.worker, self.partition));
        if self.partition == 7 {
            panic!("client 7 always breaks its worker");
        }
        let round = config_f64(&ins.config, "server_round", 0.0)?;
        let w = ins.parameters.tensors[0].data.as_f32().unwrap();
        // Values whose sum depends on the order of addition in f32/f64.
        let k = 1.0 + self.partition as f32 * 1e-3 + round as f32 * 1e-7;
        let mut data: Vec<f32> = w.iter().map(|v| v * 0.9 + k.sqrt() / 3.0).collect();
        // Large and small values: their f64 sum rounds differently in
        // another order.
        data[1] = if self.partition.is_multiple_of(2) {
            1.0e12
        } else {
            k * 1e-5
        };
        Ok(FitRes {
            parameters: Parameters::new(vec![Tensor::new(vec![3], data)?]),
            num_examples: 10 + self.partition as u64 % 7,
            metrics: [("train_loss".to_string(), Scalar::Double(k as f64))].into(),
        })
    }
    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        let w = ins.parameters.tensors[0].data.as_f32().unwrap();
        Ok(EvaluateRes {
            loss: w[0],
            num_examples: 5,
            metrics: Config::new(),
        })
    }
}

fn toy_pool(workers: usize, ran: Arc<Mutex<Vec<(usize, usize)>>>) -> Arc<WorkerPool> {
    let make: MakeReplica = Arc::new(move |worker| {
        Ok(Box::new(Toy {
            worker,
            ran: ran.clone(),
        }) as Box<dyn Replica>)
    });
    Arc::new(WorkerPool::new(workers, Isolation::Threads(make)).unwrap())
}

async fn simulate(workers: usize) -> (History, Vec<(usize, usize)>, Parameters) {
    let ran = Arc::new(Mutex::new(Vec::new()));
    let federation = Federation::new(40, toy_pool(workers, ran.clone()));
    let mut strategy = FedAvg::new(FedAvgConfig {
        fit_clients: 13,
        min_available_clients: 40,
        fraction_evaluate: 0.1,
        ..Default::default()
    })
    .unwrap();
    let config = RunConfig {
        num_rounds: 4,
        fold_in_order: true,
        max_in_flight: 2 * workers,
        sample_seed: 11,
        ..Default::default()
    };
    struct Last(Mutex<Option<Parameters>>);
    impl petal_core::RoundObserver for Last {
        fn round_done(&self, _: &History, c: &petal_core::Checkpoint) -> Result<(), CoreError> {
            *self.0.lock().unwrap() = Some((*c.parameters).clone());
            Ok(())
        }
    }
    let last = Last(Mutex::new(None));
    let history = run_federation(&federation, &mut strategy, &config, None, &last)
        .await
        .unwrap();
    let model = last.0.lock().unwrap().take().unwrap();
    let ran = ran.lock().unwrap().clone();
    (history, ran, model)
}

fn bits(p: &Parameters) -> Vec<u32> {
    p.tensors[0]
        .data
        .as_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_is_the_same_to_the_bit_whatever_the_number_of_workers() {
    let (h1, ran1, m1) = simulate(1).await;
    let (h4, ran4, m4) = simulate(4).await;
    assert_eq!(bits(&m1), bits(&m4));
    assert!(ran1.iter().all(|&(w, _)| w == 0));
    let workers: std::collections::BTreeSet<usize> = ran4.iter().map(|&(w, _)| w).collect();
    assert!(
        workers.len() > 1,
        "four workers shared the tasks: {workers:?}"
    );
    // Same clients sampled, the same failures recorded.
    let clients = |ran: &[(usize, usize)]| {
        let mut c: Vec<usize> = ran.iter().map(|&(_, p)| p).collect();
        c.sort_unstable();
        c
    };
    assert_eq!(clients(&ran1), clients(&ran4));
    for (a, b) in h1.rounds.iter().zip(&h4.rounds) {
        assert_eq!(a.fit_results, b.fit_results);
        assert_eq!(a.fit_failures, b.fit_failures);
        assert_eq!(a.loss.map(f64::to_bits), b.loss.map(f64::to_bits));
    }
    let broke = h1
        .rounds
        .iter()
        .flat_map(|r| &r.failures)
        .find(|f| f.reason.contains("client 7 always breaks"));
    if ran1.iter().any(|&(_, p)| p == 7) {
        let f = broke.expect("client 7's panic is its failure");
        assert_eq!(f.node, Some(node_of(7)));
    }
}

#[tokio::test]
async fn a_federation_has_every_client_and_no_other() {
    let ran = Arc::new(Mutex::new(Vec::new()));
    let pool = toy_pool(2, ran);
    let f = Federation::new(3, pool.clone());
    assert_eq!(f.node_ids(), vec![node_of(0), node_of(1), node_of(2)]);
    assert!(f.get(NodeId(0)).is_none());
    assert!(f.get(node_of(3)).is_none());
    assert!(f.wait_for(3, None).await);
    assert!(!f.wait_for(4, None).await, "nobody joins a simulation");
    let c = f.get(node_of(2)).unwrap();
    let p = c.get_parameters(Config::new(), None).await.unwrap();
    assert_eq!(p.tensors[0].shape, vec![3]);
    assert_eq!(pool.stats().tasks.load(Ordering::Relaxed), 1);
    assert_eq!(partition_of(node_of(2), 3), Some(2));
    assert_eq!(partition_of(NodeId(0), 3), None);
}
