-- Orthanc -> mSTAR trigger: when a slide microscopy series becomes stable (no new instance for
-- StableAge seconds), ask the mSTAR gateway to analyse it. The gateway's idempotency key makes a repeat
-- (a re-sent series, the watcher seeing it too) return the same job, so each series is analysed once.
--
-- Environment of the Orthanc process:
--   MSTAR_GATEWAY_URL     e.g. https://mstar.example.org
--   MSTAR_TRIGGER_API_KEY an API key of the tenant that owns the PACS entry
--   MSTAR_TRIGGER_PACS    the name of this Orthanc in MSTAR_PACS_SERVERS
-- Only UIDs leave Orthanc here: no patient attribute is sent or logged.

function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] ~= 'SM' then
    return
  end
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local study = ParseJson(RestApiGet('/studies/' .. series['ParentStudy']))
  local body = DumpJson({
    pacs = os.getenv('MSTAR_TRIGGER_PACS'),
    study_uid = study['MainDicomTags']['StudyInstanceUID'],
    series_uid = tags['SeriesInstanceUID'],
  }, true)
  local headers = {
    ['Authorization'] = 'Bearer ' .. os.getenv('MSTAR_TRIGGER_API_KEY'),
    ['Content-Type'] = 'application/json',
  }
  HttpPost(os.getenv('MSTAR_GATEWAY_URL') .. '/pacs/analyses', body, headers)
  print('mstar: analysis requested for series ' .. tags['SeriesInstanceUID'])
end
