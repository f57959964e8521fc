"""scVAE's GMVAE (cellembed/models/gmvae.py): the ELBO against the sum over K = 2 components
written out, recovery of planted clusters, determinism, gene selection, K without labels,
save / load, new cells, real data."""


import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import distributions as D

from cellembed.models import get_model
from cellembed.models.gmvae import GMVAEConfig, GMVAEModule, gmvae_loss, gmvae_terms
from conftest import make_counts

EASY = {"hidden": (32,), "latent": 4, "epochs": 30, "warmup": 15, "lr": 3e-3, "batch_size": 10}


def test_elbo_is_the_two_component_sum_written_out():
    """scVAE's model: q(z | x, y) reads y, the ELBO's per-cell categorical KL (kl_y="cell")."""
    torch.manual_seed(0)
    module = GMVAEModule(n_genes=7, n_components=2, hidden=(8,), latent=3, z_reads_y=True)
    with torch.no_grad():
        module.log_theta.normal_()
        module.pz_logvar.weight.normal_()
    counts = torch.poisson(torch.rand(4, 7) * 5) + 1
    x, library = torch.log1p(counts), counts.sum(1)
    terms = gmvae_terms(module, x, counts, library, sample=False)

    q_y = torch.softmax(module.qy(x), -1)  # (B, 2)
    theta = module.log_theta.exp()
    expected_recon = torch.zeros(4)
    expected_klz = torch.zeros(4)
    for k in range(2):
        onehot = torch.zeros(2)
        onehot[k] = 1
        h = torch.relu(module.qz_x(x) + module.qz_y.weight @ onehot)  # q(z | x, y=k): MLP on [x, y]
        mu_q, logvar_q = module.qz_mu(h), module.qz_logvar(h)
        mu_p, logvar_p = module.pz_mu.weight @ onehot, module.pz_logvar.weight @ onehot
        rate = torch.softmax(module.decoder(mu_q), -1) * library[:, None]
        nb = D.NegativeBinomial(total_count=theta, logits=torch.log(rate) - torch.log(theta))
        expected_recon -= q_y[:, k] * nb.log_prob(counts).sum(1)
        kl = D.kl_divergence(D.Normal(mu_q, (0.5 * logvar_q).exp()), D.Normal(mu_p, (0.5 * logvar_p).exp()))
        expected_klz += q_y[:, k] * kl.sum(1)
    expected_kly = D.kl_divergence(D.Categorical(probs=q_y), D.Categorical(probs=torch.full((2,), 0.5)))
    torch.testing.assert_close(terms["recon"], expected_recon, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms["kl_z"], expected_klz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["kl_y"], expected_kly, rtol=1e-5, atol=1e-6)
    # the loss at KL weight 1 is the negative ELBO, mean over cells (here with z drawn)
    torch.manual_seed(1)
    loss, parts = gmvae_loss(module, (x, counts, library), 1.0, kl_y="cell")
    assert parts["kl"] == pytest.approx((expected_klz + expected_kly).mean().item(), rel=1e-4)
    assert loss.item() == pytest.approx(parts["recon"] + parts["kl"], rel=1e-6)
    assert parts["elbo"] == pytest.approx(-loss.item(), rel=1e-6)


def test_shared_encoder_elbo_and_the_marginal_categorical_kl():
    """Our default: one q(z | x) for every component, and KL(q(y) || Cat(1/K)) of the batch mean."""
    torch.manual_seed(0)
    module = GMVAEModule(n_genes=7, n_components=3, hidden=(8,), latent=3)
    assert module.qz_y is None
    counts = torch.poisson(torch.rand(5, 7) * 5) + 1
    x, library = torch.log1p(counts), counts.sum(1)
    terms = gmvae_terms(module, x, counts, library, sample=False)

    q_y = torch.softmax(module.qy(x), -1)  # (B, 3)
    h = torch.relu(module.qz_x(x))  # q(z | x): no y
    mu_q, logvar_q = module.qz_mu(h), module.qz_logvar(h)
    rate = torch.softmax(module.decoder(mu_q), -1) * library[:, None]
    theta = module.log_theta.exp()
    nb = D.NegativeBinomial(total_count=theta, logits=torch.log(rate) - torch.log(theta))
    torch.testing.assert_close(terms["recon"], -nb.log_prob(counts).sum(1), rtol=1e-4, atol=1e-3)
    q_z = D.Normal(mu_q, (0.5 * logvar_q).exp())
    priors = [D.Normal(module.pz_mu.weight[:, k], (0.5 * module.pz_logvar.weight[:, k]).exp()) for k in range(3)]
    kls = torch.stack([D.kl_divergence(q_z, p_k).sum(1) for p_k in priors], 1)  # (B, K)
    torch.testing.assert_close(terms["kl_z"], (q_y * kls).sum(1), rtol=1e-5, atol=1e-5)

    q_bar = q_y.mean(0)
    marginal = D.kl_divergence(D.Categorical(probs=q_bar), D.Categorical(probs=torch.full((3,), 1 / 3)))
    torch.testing.assert_close(terms["kl_y_marginal"], marginal.expand(5), rtol=1e-5, atol=1e-6)
    # ELBO surgery: mean per-cell KL = I(x; y) + marginal KL, with I >= 0
    mutual_info = (q_y * (q_y / q_bar).log()).sum(1).mean()
    torch.testing.assert_close(terms["kl_y"].mean(), mutual_info + marginal, rtol=1e-5, atol=1e-6)
    assert mutual_info > 0

    loss, parts = gmvae_loss(module, (x, counts, library), 1.0)  # kl_y="marginal" by default
    assert parts["kl"] == pytest.approx(terms["kl_z"].mean().item() + marginal.item(), rel=1e-5)
    assert parts["elbo"] < -loss.item()  # the ELBO pays the mutual information on top


def test_marginal_kl_is_zero_for_balanced_confident_clusters_and_log_k_for_one():
    module = GMVAEModule(n_genes=4, n_components=2, hidden=(3,), latent=2)
    x = torch.eye(4)
    with torch.no_grad():
        module.qy[-1].weight.zero_()
        module.qy[-1].bias.copy_(torch.tensor([20.0, -20.0]))  # every cell in component 0
    collapsed = gmvae_terms(module, x, x, torch.ones(4), sample=False)
    assert collapsed["kl_y_marginal"][0].item() == pytest.approx(np.log(2), rel=1e-4)
    module.qy = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with torch.no_grad():
        module.qy[0].weight.copy_(torch.tensor([[20.0, 20, -20, -20], [-20, -20, 20, 20]]))
        module.qy[0].bias.zero_()
    split = gmvae_terms(module, x, x, torch.ones(4), sample=False)
    assert split["kl_y_marginal"][0].item() == pytest.approx(0.0, abs=1e-6)
    # the ELBO's per-cell KL cannot tell the two apart: log 2 for every confident cell
    torch.testing.assert_close(split["kl_y"], collapsed["kl_y"], rtol=1e-4, atol=1e-6)


def test_kl_weight_scales_both_kls():
    torch.manual_seed(0)
    module = GMVAEModule(5, 3, (6,), 2)
    counts = torch.poisson(torch.rand(6, 5) * 3) + 1
    batch = (torch.log1p(counts), counts, counts.sum(1))
    torch.manual_seed(2)
    full, parts = gmvae_loss(module, batch, 1.0)
    torch.manual_seed(2)
    none, _ = gmvae_loss(module, batch, 0.0)
    assert (full - none).item() == pytest.approx(parts["kl"], rel=1e-4)


def test_recovers_planted_clusters_and_is_deterministic():
    adata = make_counts(n_per_type=40, n_types=3, n_genes=60)
    labels = adata.obs["Celltype"].to_numpy()
    model = get_model("gmvae")(**EASY).fit(adata, labels_key="Celltype", seed=0)
    assert adjusted_rand_score(labels, model.predict(adata)) > 0.9
    assert all(np.isfinite(list(r.values())).all() for r in model.history)
    assert model.history[-1]["recon"] < model.history[0]["recon"]
    assert model.history[0]["kl_weight"] == 0 and model.history[-1]["kl_weight"] == 1
    z = model.get_latent(adata)
    assert z.shape == (adata.n_obs, 4)
    again = get_model("gmvae")(**{**EASY, "epochs": 3}).fit(adata, n_clusters=3, seed=0)
    twice = get_model("gmvae")(**{**EASY, "epochs": 3}).fit(adata, n_clusters=3, seed=0)
    assert again.history == twice.history
    np.testing.assert_array_equal(again.get_latent(adata), twice.get_latent(adata))
    np.testing.assert_array_equal(again.predict(adata), again.predict(adata))


def test_k_defaults_to_the_number_of_classes_and_many_genes_are_reduced():
    adata = make_counts(n_per_type=10, n_types=4, n_genes=80)
    model = get_model("gmvae")(**{**EASY, "epochs": 1, "n_top_genes": 30}).fit(adata, labels_key="Celltype")
    assert model.n_clusters_ == model.module_.n_components == 4
    assert model.genes_.size == 30 and model.genes_.dtype.kind == "i"
    assert model.get_latent(adata).shape == (40, 4) and set(model.predict(adata)) <= set(range(4))
    assert get_model("gmvae").clusters


def test_fits_without_labels_given_n_clusters_and_refuses_neither():
    adata = make_counts(n_per_type=10, n_types=4, n_genes=40)
    unlabelled = adata.copy()
    del unlabelled.obs["Celltype"]
    model = get_model("gmvae")(**{**EASY, "epochs": 1}).fit(unlabelled, n_clusters=3)
    assert model.n_clusters_ == model.module_.n_components == 3
    assert model.predict(unlabelled).shape == (40,) and set(model.predict(unlabelled)) <= {0, 1, 2}
    assert model.get_latent(unlabelled).shape == (40, 4)
    # n_clusters wins over the number of labelled classes (4)
    two = get_model("gmvae")(**{**EASY, "epochs": 1}).fit(adata, labels_key="Celltype", n_clusters=2)
    assert two.n_clusters_ == two.module_.n_components == 2
    with pytest.raises(ValueError, match="pass n_clusters=K"):
        get_model("gmvae")(**{**EASY, "epochs": 1}).fit(unlabelled)
    with pytest.raises(ValueError, match="pass n_clusters=K"):
        get_model("gmvae")(**{**EASY, "epochs": 1}).fit(adata)  # labels present but not named


def test_save_and_load_give_the_same_latent_and_clusters(tmp_path):
    adata = make_counts(n_per_type=15, n_types=3, n_genes=60)
    model = get_model("gmvae")(**{**EASY, "epochs": 3, "n_top_genes": 30}).fit(adata, n_clusters=3, seed=0)
    z, clusters = model.get_latent(adata), model.predict(adata)
    assert np.ptp(z, axis=0).min() > 0  # a latent that varies: the comparison below can fail
    model.save(tmp_path / "gmvae")
    loaded = get_model("gmvae").load(tmp_path / "gmvae", device="cpu")
    assert loaded.n_clusters_ == 3 and loaded.history == model.history
    np.testing.assert_array_equal(loaded.genes_, model.genes_)
    np.testing.assert_array_equal(loaded.get_latent(adata), z)
    np.testing.assert_array_equal(loaded.predict(adata), clusters)


def test_new_cells_are_embedded_independently_of_the_batch():
    adata = make_counts(n_per_type=30, n_types=3, n_genes=60)
    n_fit = 2 * adata.n_obs // 3
    model = get_model("gmvae")(**{**EASY, "epochs": 3}).fit(adata[:n_fit].copy(), n_clusters=3, seed=0)
    new = adata[n_fit:].copy()
    alone = model.get_latent(new)
    assert alone.shape == (adata.n_obs - n_fit, 4)
    assert np.ptp(alone, axis=0).min() > 0
    np.testing.assert_allclose(model.get_latent(adata)[n_fit:], alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_latent(new[5:6].copy()), alone[5:6], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.predict(adata)[n_fit:], model.predict(new))


def test_defaults_are_the_studys_and_the_scvae_recipe():
    cfg = GMVAEConfig()
    assert (cfg.hidden, cfg.latent, cfg.epochs, cfg.lr) == ((250,), 50, 100, 1e-4)
    big = GMVAEConfig.scvae_recipe()
    assert (big.hidden, big.latent, big.warmup, big.epochs) == ((100, 100), 100, 200, 500)
    assert (cfg.z_reads_y, cfg.kl_y, cfg.prior_scale) == (False, "marginal", 0.1)
    source = GMVAEConfig.scvae()
    assert (source.z_reads_y, source.kl_y, source.prior_scale) == (True, "cell", 1.0)
    with pytest.raises(ValueError, match="kl_y='elbo'"):
        GMVAEConfig(kl_y="elbo")
    adata = make_counts(n_per_type=5)
    model = get_model("gmvae")(GMVAEConfig.scvae_recipe(epochs=1, warmup=1)).fit(adata, labels_key="Celltype")
    assert model.get_latent(adata).shape == (15, 100)


def test_real_10x_pbmc_short_run(data_root):
    from cellembed.data import load_dataset

    adata = load_dataset("10x_pbmc", data_root=data_root)[:400].copy()
    model = get_model("gmvae")(epochs=2).fit(adata, labels_key="Celltype", seed=0)
    assert model.n_clusters_ == model.module_.n_components == adata.obs["Celltype"].nunique()
    assert all(np.isfinite(r["loss"]) for r in model.history)
    assert model.predict(adata).shape == (400,) and model.get_latent(adata).shape == (400, 50)


def test_real_pbmc3k_uses_many_components(data_root):
    """1,000 real PBMC 3k cells, 30 epochs: the defaults spread the cells over the components
    (scVAE's model and objective, `GMVAEConfig.scvae`, put all 1,000 in one on the same run)."""
    from cellembed.data import load_dataset

    adata = load_dataset("pbmc3k", data_root=data_root)
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)[:1000]].copy()
    model = get_model("gmvae")(epochs=30, warmup=12).fit(adata, labels_key="Celltype", seed=0)
    clusters = model.predict(adata)
    assert (np.bincount(clusters) >= 50).sum() >= 4
    assert adjusted_rand_score(adata.obs["Celltype"], clusters) > 0.2
